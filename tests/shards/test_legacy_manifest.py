"""Datasets written before the manifest was a Delta table keep working: read as they are,
converted by their next write, nothing lost or doubled."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
from table_reader import current_rows

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import batches, layout, manifest
from pneumo.shards.store import open_store


def _as_legacy(out: Path) -> list[dict]:
    """Rewrite a dataset's tables as the hive Parquet parts pneumo wrote before (one per
    batch, samples and quarantine), with a relabelled image's old row kept beside the new."""
    store = open_store(out)
    rows = manifest.read(store).to_pylist()
    quarantine = manifest.read(store, table="quarantine").to_pylist()
    shutil.rmtree(out / "manifest")
    shutil.rmtree(out / "quarantine", ignore_errors=True)
    stale = dict(rows[0], has_ptx=not rows[0]["has_ptx"], labels_version=1, batch="old")
    rows[0] = dict(rows[0], labels_version=2)
    for name, table, dir_ in (
        ("samples", rows + [stale], layout.MANIFEST_DIR),
        ("quarantine", quarantine, layout.QUARANTINE_DIR),
    ):
        for dataset, batch in {(r["dataset"], r["batch"]) for r in table}:
            mine = [r for r in table if (r["dataset"], r["batch"]) == (dataset, batch)]
            part = out / dir_ / f"dataset={dataset}" / f"batch={batch}" / "part-0.parquet"
            part.parent.mkdir(parents=True)
            data = manifest.to_table(mine, name).drop_columns(["dataset", "batch"])  # type: ignore[arg-type]
            pq.write_table(data, part)
    return rows


def test_a_legacy_dataset_is_read_then_converted_by_its_next_batch(shared_data, tmp_path):
    sample = shared_data / "siim" / "sample_images"
    dicoms = sorted(sample.glob("*.dcm"))
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, files in ((first, dicoms[:5]), (second, dicoms[3:8])):
        folder.mkdir()
        for f in files:
            shutil.copy(f, folder / f.name)
    (first / "broken.dcm").write_bytes(b"not a dicom")
    out = tmp_path / "ds"
    labels = sample / "train-rle-sample.csv"
    cfg = SiimConfig(dicom_root=str(first), labels=labels, batch=BatchConfig(out=str(out)))
    ingest_siim(cfg)
    expected = {r["image_id"]: r for r in _as_legacy(out)}
    store = open_store(out)
    assert manifest.is_legacy(store)
    got = {r["image_id"]: r for r in manifest.read(store).to_pylist()}
    assert got == expected  # one row per image: the relabelled one's latest labels
    q_before = manifest.read(store, table="quarantine").to_pylist()
    assert any(r["source"].endswith("broken.dcm") for r in q_before)
    ingest_siim(SiimConfig(dicom_root=str(second), labels=labels, batch=BatchConfig(out=str(out))))
    assert not manifest.is_legacy(store)
    assert not [p for p in store.list("manifest/") if "/batch=" in p]  # parts removed
    rows = current_rows(store)
    assert sorted(r["image_id"] for r in rows) == sorted(f.stem for f in dicoms[:8])
    kept = {r["image_id"]: r for r in rows}
    for image_id, row in expected.items():  # the converted rows as they were
        assert {k: kept[image_id][k] for k in row} == row
    q_after = manifest.read(store, table="quarantine").to_pylist()
    assert [r for r in q_after if r["batch"] == q_before[0]["batch"]] == q_before
    states = {b.batch: b.state for b in batches.list_batches(store)}
    assert len(states) == 3 and set(states.values()) == {"committed"}  # "old" too


def test_a_damaged_table_is_one_line_naming_it(shared_data, tmp_path, pneumo):
    """A commit file or a data file of the manifest damaged on disk: every reader stops
    with one line naming the table, never a traceback or a silently shorter manifest."""
    sample = shared_data / "siim" / "sample_images"
    out = tmp_path / "ds"
    ingest_siim(SiimConfig(dicom_root=str(sample), batch=BatchConfig(out=str(out))))
    data = next((out / "manifest").rglob("*.parquet"))
    data.write_bytes(data.read_bytes()[:-100])  # a truncated data file
    proc = pneumo("manifest", str(out), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "manifest" in proc.stderr
    log = out / "manifest" / "_delta_log" / "00000000000000000000.json"
    log.write_text(log.read_text()[:50])  # a torn commit file
    for args in (("manifest", str(out)), ("batch", "list", str(out)), ("audit", str(out))):
        proc = pneumo(*args, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        (line,) = proc.stderr.strip().splitlines()
        assert str(out / "manifest") in line, line
