"""One patient, one split: SIIM and NIH rows of the same patients, in every ingest order,
worker count and shard size; the audit that checks it; what a later batch may not move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.nih import NihConfig, ingest_nih
from pneumo.ingest.patients import PatientSecret
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import manifest
from pneumo.shards.store import open_store

SECRET = PatientSecret("test-secret-0123456789abcdef", "tests")


def _batch(out: Path, workers: int = 1, shard_size: int = 1000) -> BatchConfig:
    return BatchConfig(
        out=str(out), workers=workers, shard_max_samples=shard_size, patient_secret=SECRET
    )


def _siim(linked, out, *, lists=True, xref=True, **kw):
    return ingest_siim(
        SiimConfig(
            dicom_root=str(linked.siim_dir),
            labels=linked.siim_labels,
            nih_xref=linked.xref if xref else None,
            split_lists=(linked.train_val, linked.test_list) if lists else None,
            batch=_batch(out, **kw),
        )
    )


def _nih(linked, out, *, lists=True, **kw):
    return ingest_nih(
        NihConfig(
            image_root=str(linked.nih_dir),
            labels=linked.data_entry,
            train_val_list=linked.train_val if lists else None,
            test_list=linked.test_list if lists else None,
            batch=_batch(out, **kw),
        )
    )


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["dataset"], r["image_id"]): r for r in manifest.read(open_store(out)).to_pylist()}


def _patient_of(linked, dataset: str, image_id: str) -> str:
    return linked.siim_patient[image_id] if dataset == "siim" else image_id[:8]


def _test_patients(linked) -> set[str]:
    return {line[:8] for line in linked.test_list.read_text().split()}


@pytest.fixture(scope="module")
def reference(linked, tmp_path_factory) -> Path:
    """SIIM then NIH, one worker, default shard size; lists given to both."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    _siim(linked, out)
    _nih(linked, out)
    return out


def test_the_reference_is_patient_level_and_follows_the_official_lists(reference, linked):
    rows = _rows(reference)
    assert len(rows) == 11 + len(linked.nih_images)
    test_patients = _test_patients(linked)
    split_of: dict[str, set[str]] = {}
    key_of: dict[str, set[str]] = {}
    for (dataset, image_id), r in rows.items():
        patient = _patient_of(linked, dataset, image_id)
        split_of.setdefault(patient, set()).add(r["split"])
        key_of.setdefault(patient, set()).add(r["patient_key"])
        assert (r["split"] == "test") == (patient in test_patients), (dataset, image_id)
        assert r["patient_basis"] == ("nih-xref" if dataset == "siim" else "nih-patient-id")
    assert len(split_of) == 11
    assert all(len(s) == 1 for s in split_of.values())  # one split per patient, both datasets
    assert all(len(k) == 1 for k in key_of.values())  # one key per patient, both datasets
    assert {"test", "train"} <= {s for v in split_of.values() for s in v}


@pytest.mark.parametrize(
    "order, workers, shard_size",
    [
        (order, workers, shard_size)
        for order in ("siim-nih", "nih-siim")
        for workers in (1, 2)
        for shard_size in (1, 1000)
        if (order, workers, shard_size) != ("siim-nih", 1, 1000)
    ],
)
def test_every_order_worker_count_and_shard_size_gives_the_same_splits(
    reference, linked, tmp_path, order, workers, shard_size
):
    out = tmp_path / "ds"
    steps = {"siim": _siim, "nih": _nih}
    for name in order.split("-"):
        steps[name](linked, out, workers=workers, shard_size=shard_size)
    got = {k: (r["split"], r["patient_key"]) for k, r in _rows(out).items()}
    want = {k: (r["split"], r["patient_key"]) for k, r in _rows(reference).items()}
    assert got == want


def test_lists_on_the_first_batch_fix_the_split_for_later_batches(reference, linked, tmp_path):
    out = tmp_path / "ds"
    _nih(linked, out)
    _siim(linked, out, lists=False)  # the dataset's policy has the lists already
    got = {k: r["split"] for k, r in _rows(out).items()}
    assert got == {k: r["split"] for k, r in _rows(reference).items()}


def test_audit_passes_on_one_policy_and_fails_on_an_inconsistent_pair(
    reference, linked, tmp_path, pneumo, monkeypatch
):
    proc = pneumo("audit", str(reference), "--format", "json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"] and report["overlapping_patients"] == 0
    assert {(g["dataset"], g["split"]) for g in report["groups"]} >= {
        ("siim", "test"),
        ("nih", "test"),
    }
    # Another dataset of the same NIH patients, same secret, without the official lists:
    # its patients are split by hash, so most official-test patients land elsewhere.
    other = tmp_path / "other"
    _nih(linked, other, lists=False)
    a, b = _rows(reference), _rows(other)
    split_a = {_patient_of(linked, d, i): r["split"] for (d, i), r in a.items()}
    split_b = {_patient_of(linked, d, i): r["split"] for (d, i), r in b.items()}
    moved = {p for p in split_b if split_b[p] != split_a[p]}
    assert moved, "the hash split must differ from the official lists for some patient"
    want_pairs: dict[tuple[str, str], int] = {}
    for p in moved:
        for ds_a in sorted({d for (d, i) in a if _patient_of(linked, d, i) == p}):
            pair = (f"{reference}:{ds_a}/{split_a[p]}", f"{other}:nih/{split_b[p]}")
            want_pairs[tuple(sorted(pair))] = want_pairs.get(tuple(sorted(pair)), 0) + 1
    proc = pneumo("audit", str(reference), str(other), "--format", "json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and not report["ok"]
    assert report["overlapping_patients"] == len(moved)
    assert {(p["a"], p["b"]): p["patients"] for p in report["pairs"]} == want_pairs
    table = pneumo("audit", str(reference), str(other), check=False).stdout
    assert f"patients in more than one split: {len(moved)}" in table


def test_a_later_batch_keeps_committed_splits_and_reports_them(linked, tmp_path):
    out = tmp_path / "ds"
    _siim(linked, out, lists=False)  # the policy: hash split, no forced test
    siim_split = {
        linked.siim_patient[i]: (r["split"], r["patient_key"]) for (d, i), r in _rows(out).items()
    }
    summary = _nih(linked, out)  # the official lists, on a later batch
    want_kept = {
        key: (split, "test")
        for patient, (split, key) in siim_split.items()
        if patient in _test_patients(linked) and split != "test"
    }
    assert want_kept, "with 6 listed patients split by hash, some are not test"
    assert summary.kept_split == want_kept
    for (dataset, image_id), r in _rows(out).items():
        if dataset == "nih":
            assert r["split"] == siim_split[image_id[:8]][0]


def test_a_test_list_forces_whole_patients_in_both_datasets(linked, tmp_path):
    # One SIIM id listed: its NIH patient (through the xref) goes to test, NIH images too.
    listed = next(i for i, p in linked.siim_patient.items() if p not in _test_patients(linked))
    test_list = tmp_path / "test-ids.txt"
    test_list.write_text(listed + "\n")
    out = tmp_path / "ds"
    ingest_siim(
        SiimConfig(
            dicom_root=str(linked.siim_dir),
            nih_xref=linked.xref,
            test_list=test_list,
            batch=_batch(out),
        )
    )
    _nih(linked, out, lists=False)
    patient = linked.siim_patient[listed]
    splits = {
        r["split"] for (d, i), r in _rows(out).items() if _patient_of(linked, d, i) == patient
    }
    assert splits == {"test"} and sum(1 for (d, i) in _rows(out) if d == "nih" and i[:8] == patient)


def test_another_xref_or_list_is_another_batch(linked, tmp_path):
    out = tmp_path / "ds"
    first = _siim(linked, out, lists=False)
    xref = tmp_path / "xref.csv"
    xref.write_text(linked.xref.read_text().replace("\n1.2.276", "\n1.2.276", 1) + "\n")
    again = ingest_siim(
        SiimConfig(
            dicom_root=str(linked.siim_dir),
            labels=linked.siim_labels,
            nih_xref=xref,
            batch=_batch(out),
        )
    )
    assert not again.already_committed and again.batch != first.batch
    assert again.committed and again.skipped == 11 and again.ingested == 0
    same = _siim(linked, out, lists=False)
    assert same.already_committed and same.batch == first.batch
