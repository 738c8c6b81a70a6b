"""The leakage audit on hand-made rows, where the right and the plausible wrong counts differ."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pneumo.shards import layout, manifest
from pneumo.shards.audit import audit, audit_datasets, held_out_overlap
from pneumo.shards.errors import ManifestError
from pneumo.shards.store import open_store


def _rows(*rows: tuple[str, str, str | None, str]) -> pa.Table:
    names = ["dataset", "split", "patient_key", "patient_basis"]
    return pa.Table.from_pylist([dict(zip(names, r, strict=True)) for r in rows])


def test_patients_in_two_splits_are_counted_once_with_every_pair():
    table = _rows(
        ("siim", "train", "p1", "nih-xref"),
        ("siim", "train", "p1", "nih-xref"),  # two images, one patient: counted once
        ("nih", "test", "p1", "nih-patient-id"),
        ("siim", "val", "p1", "nih-xref"),
        ("siim", "test", "p2", "nih-xref"),
        ("nih", "test", "p2", "nih-patient-id"),  # same split in two datasets: fine
        ("siim", "train", "p3", "siim-image"),
        ("siim", "train", None, "siim-image"),
    )
    report = audit(table)
    assert report.overlapping_patients == 1 and not report.ok
    assert report.pairs == {
        ("nih/test", "siim/train"): 1,
        ("nih/test", "siim/val"): 1,
        ("siim/train", "siim/val"): 1,
    }
    groups = {(g.dataset, g.split): (g.images, g.patients, g.image_level) for g in report.groups}
    assert groups == {
        ("nih", "test"): (2, 2, 0),
        ("siim", "test"): (1, 1, 0),
        ("siim", "train"): (4, 2, 2),
        ("siim", "val"): (1, 1, 0),
    }
    assert report.image_level_images == 2


def test_one_split_per_patient_across_datasets_is_ok():
    report = audit(_rows(("siim", "val", "p", "nih-xref"), ("nih", "val", "p", "nih-patient-id")))
    assert report.ok and report.pairs == {} and report.to_dict()["overlapping_patients"] == 0


def test_images_and_patients_are_counted_per_dataset_and_basis():
    table = _rows(
        ("nih", "train", "p1", "nih-patient-id"),
        ("nih", "test", "p1", "nih-patient-id"),  # one patient, two splits: still one
        ("siim", "train", "p1", "nih-xref"),  # the same key in another dataset
        ("siim", "val", "p4", "dicom-patient-id"),
        ("siim", "val", "p5", "dicom-patient-id"),
        ("siim", "train", "p6", "dicom-image"),
        ("siim", "train", None, "dicom-image"),  # no key: an image, no patient
        ("siim", "test", "p7", None),  # written before bases existed
    )
    bases = {(b.dataset, b.basis): b for b in audit(table).bases}
    got = {k: (b.images, b.patients, b.image_level) for k, b in bases.items()}
    assert got == {
        ("nih", "nih-patient-id"): (2, 1, False),
        ("siim", "nih-xref"): (1, 1, False),
        ("siim", "dicom-patient-id"): (2, 2, False),
        ("siim", "dicom-image"): (2, 1, True),
        ("siim", ""): (1, 1, False),
    }
    # One image per patient on a patient-level basis: what Kaggle SIIM's PatientIDs give.
    one_each = {k for k, b in bases.items() if b.one_image_per_patient}
    assert one_each == {("siim", "dicom-patient-id")}
    shown = audit(table).to_dict()["bases"]
    assert {(b["dataset"], b["basis"]): b["images"] for b in shown} == {
        k: v[0] for k, v in got.items()
    }


def test_rows_without_a_basis_column_are_patient_level_with_an_empty_basis():
    table = pa.Table.from_pylist(
        [
            {"dataset": "siim", "split": "train", "patient_key": "p1"},
            {"dataset": "siim", "split": "train", "patient_key": "p1"},
            {"dataset": "siim", "split": "val", "patient_key": "p2"},
        ]
    )
    report = audit(table)
    assert [(g.split, g.images, g.patients, g.image_level) for g in report.groups] == [
        ("train", 2, 1, 0),
        ("val", 1, 1, 0),
    ]
    assert report.image_level_images == 0
    assert [(b.dataset, b.basis, b.images, b.patients, b.image_level) for b in report.bases] == [
        ("siim", "", 3, 2, False)
    ]


def test_every_patient_in_exactly_two_splits_counts_after_keyless_rows_and_clean_patients():
    table = _rows(
        ("siim", "train", None, "dicom-image"),  # no key, then more rows: they still count
        ("siim", "train", "clean", "dicom-patient-id"),  # one split: fine, then the others
        ("siim", "train", "p1", "dicom-patient-id"),
        ("siim", "test", "p1", "dicom-patient-id"),
        ("siim", "train", "p2", "dicom-patient-id"),
        ("siim", "test", "p2", "dicom-patient-id"),
        ("siim", "val", "p3", "dicom-patient-id"),
        ("siim", "test", "p3", "dicom-patient-id"),
    )
    report = audit(table)
    assert report.overlapping_patients == 3
    assert report.pairs == {("siim/test", "siim/train"): 2, ("siim/test", "siim/val"): 1}
    groups = {g.split: (g.images, g.patients) for g in report.groups}
    assert groups == {"train": (4, 3), "test": (3, 3), "val": (1, 1)}


def test_the_json_form_names_every_field():
    report = audit(_rows(("a", "train", "p", "nih-xref"), ("a", "test", "p", "nih-xref")))
    assert report.to_dict() == {
        "ok": False,
        "datasets": [],
        "groups": [
            {"dataset": "a", "split": "test", "images": 1, "patients": 1, "image_level": 0},
            {"dataset": "a", "split": "train", "images": 1, "patients": 1, "image_level": 0},
        ],
        "overlapping_patients": 1,
        "pairs": [{"a": "a/test", "b": "a/train", "patients": 1}],
        "image_level_images": 0,
        "bases": [
            {
                "dataset": "a",
                "basis": "nih-xref",
                "images": 2,
                "patients": 1,
                "image_level": False,
                "one_image_per_patient": False,
            }
        ],
    }


def _dataset(root, name: str, check: str | None, rows: list[tuple[str, str, str]]):
    """A dataset as an older pneumo wrote it (settings + one hive Parquet part)."""
    store = open_store(root / name, create=True)
    policy = {"fractions": [0.8, 0.1, 0.1]} | ({"secret_check": check} if check else {})
    manifest.write_settings(store, {"schema_version": 2, "split_policy": policy})
    if rows:
        table = manifest.to_table(
            [
                {"dataset": "siim", "key": f"k{i}", "split": s, "patient_key": p,
                 "patient_basis": b, "batch": "b1"}
                for i, (s, p, b) in enumerate(rows)
            ]
        ).drop_columns(["dataset", "batch"])  # fmt: skip
        manifest.write_part(store, layout.manifest_part("siim", "b1"), table)
    return store


def test_datasets_are_audited_together_under_their_names(tmp_path):
    one = _dataset(tmp_path, "one", "c1", [("train", "p", "nih-xref"), ("val", "q", "nih-xref")])
    two = _dataset(tmp_path, "two", "c1", [("test", "p", "nih-xref")])
    alone = audit_datasets([("one", one)])
    assert alone.datasets == ["one"] and alone.ok
    assert {g.dataset for g in alone.groups} == {"siim"}  # one DATASET: names unchanged
    both = audit_datasets([("one", one), ("two", two)])
    assert both.datasets == ["one", "two"] and both.overlapping_patients == 1
    assert both.pairs == {("one:siim/train", "two:siim/test"): 1}
    older = _dataset(tmp_path, "older", None, [("test", "q", "nih-xref")])  # no check value
    assert audit_datasets([("one", one), ("older", older)]).overlapping_patients == 1
    other = _dataset(tmp_path, "other", "c2", [("test", "p", "nih-xref")])
    with pytest.raises(ManifestError) as e:
        audit_datasets([("one", one), ("other", other)])
    assert str(e.value) == (
        "these datasets were keyed with different patient secrets, so their patients cannot "
        "be matched (check values: {'one': 'c1', 'other': 'c2'}); audit them one at a time"
    )
    empty = _dataset(tmp_path, "empty", "c1", [])
    with pytest.raises(ManifestError, match=r"^empty has no committed batch: is it a dataset\?$"):
        audit_datasets([("one", one), ("empty", empty)])


def test_held_out_overlap_is_the_shared_keys_without_missing_ones():
    train = pa.table({"patient_key": ["a", "b", None, "c"]})
    held = pa.table({"patient_key": ["c", None, "d", "a"]})
    assert held_out_overlap(train, held) == {"a", "c"}
