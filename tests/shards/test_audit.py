"""The leakage audit on hand-made rows, where the right and the plausible wrong counts differ."""

from __future__ import annotations

import pyarrow as pa

from pneumo.shards.audit import audit


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
