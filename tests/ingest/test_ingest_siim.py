"""The SIIM ingest run on the real files: shards, manifest, quarantine, re-runs, privacy."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.rle import combine_masks
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import layout, manifest
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import open_store


def _all_siim_dicoms(shared: Path) -> list[Path]:
    siim = shared / "siim"
    return (
        sorted(siim.glob("sample_images/*.dcm"))
        + sorted(siim.glob("dicom_train/*.dcm"))
        + sorted(siim.glob("stage2_test/*.dcm"))
    )


@pytest.fixture(scope="module")
def siim_dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("siim") / "ds"
    cfg = SiimConfig(
        dicom_root=str(shared_data / "siim"),
        labels=shared_data / "siim" / "siim-pneumothorax-train-rle.csv.gz",
        batch=BatchConfig(out=str(out), batch="first", shard_max_samples=4),
    )
    summary = ingest_siim(cfg)
    assert summary.committed and summary.ingested == 21
    return out


def _samples(dataset: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for tar in sorted(dataset.glob("shards/**/*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_every_real_dicom_is_stored_with_its_jpeg_frame_untouched(siim_dataset, shared_data):
    table = manifest.read(open_store(siim_dataset))
    samples = _samples(siim_dataset)
    assert table.num_rows == 21 == len(samples)
    for path in _all_siim_dicoms(shared_data):
        dcm = pydicom.dcmread(path)
        key = layout.sample_key(str(dcm.SOPInstanceUID))
        assert "." not in key
        frame = next(pydicom.encaps.generate_frames(dcm.PixelData, number_of_frames=1))
        assert samples[key]["jpg"] == frame.rstrip(b"\x00") or samples[key]["jpg"] == frame


def test_masks_are_the_or_of_the_label_rows(siim_dataset, shared_data):
    from pneumo.ingest.labels import read_siim_labels

    labels, _ = read_siim_labels(shared_data / "siim" / "siim-pneumothorax-train-rle.csv.gz")
    table = manifest.read(open_store(siim_dataset)).to_pylist()
    samples = _samples(siim_dataset)
    positives = 0
    for row in table:
        label = labels.get(row["image_id"])
        if label is None:  # stage-2 test images: unlabelled, no mask
            assert row["has_ptx"] is None and "mask.png" not in samples[row["key"]]
            continue
        mask = np.array(Image.open(io.BytesIO(samples[row["key"]]["mask.png"]))) > 0
        expected = combine_masks(list(label.rles), 1024, 1024).astype(bool)
        assert (mask == expected).all()
        assert row["has_ptx"] == label.has_ptx
        assert row["mask_area_px"] == int(expected.sum())
        assert row["n_instances"] == len(label.rles)
        positives += label.has_ptx
    assert positives == 5


def test_manifest_opens_with_deltalake_and_has_the_documented_columns(siim_dataset):
    from deltalake import DeltaTable

    table = DeltaTable(str(siim_dataset / "manifest")).to_pyarrow_dataset().to_table()
    for col in (
        "key",
        "image_id",
        "dataset",
        "batch",
        "shard",
        "split",
        "has_ptx",
        "n_instances",
        "mask_area_px",
        "rows",
        "cols",
        "patient_key",
        "view_position",
        "sex",
        "age_years",
        "content_sha256",
    ):
        assert col in table.column_names
    rows = table.to_pylist()
    assert {r["dataset"] for r in rows} == {"siim"} and {r["batch"] for r in rows} == {"first"}
    for r in rows:
        assert (siim_dataset / r["shard"]).is_file()
        assert r["split"] in ("train", "val", "test")
        assert f"-{r['split']}-" in r["shard"]


def test_no_patient_identifier_reaches_shards_or_manifest(siim_dataset, shared_data):
    secrets = set()
    for path in _all_siim_dicoms(shared_data):
        dcm = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in ("PatientID", "PatientName"):
            value = str(dcm.get(tag, "") or "")
            if len(value) >= 6:
                secrets.add(value.encode())
    assert secrets, "the real files carry patient ids: the check must look for them"
    for f in siim_dataset.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for s in secrets:
                assert s not in data, f"patient id found in {f}"


def test_rerunning_a_committed_batch_adds_nothing(siim_dataset, shared_data):
    before = sorted(p.read_bytes() for p in siim_dataset.rglob("*.parquet"))
    cfg = SiimConfig(
        dicom_root=str(shared_data / "siim"),
        labels=shared_data / "siim" / "siim-pneumothorax-train-rle.csv.gz",
        batch=BatchConfig(out=str(siim_dataset), batch="first", shard_max_samples=4),
    )
    summary = ingest_siim(cfg)
    assert summary.already_committed and summary.ingested == 0 and summary.skipped == 21
    assert sorted(p.read_bytes() for p in siim_dataset.rglob("*.parquet")) == before


def test_a_new_batch_skips_images_already_in_the_dataset(siim_dataset, shared_data, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(siim_dataset, out)
    src = tmp_path / "new"
    src.mkdir()
    for p in sorted((shared_data / "siim" / "sample_images").glob("*.dcm"))[:3]:
        shutil.copy(p, src / p.name)  # already in the dataset (same SOPInstanceUID)
    clone = pydicom.dcmread(next((shared_data / "siim" / "dicom_train").glob("*.dcm")))
    clone.SOPInstanceUID = "1.2.3.4.5.6"  # a new UID, but the same pixels
    clone.save_as(src / "renamed.dcm")
    summary = ingest_siim(SiimConfig(dicom_root=str(src), batch=BatchConfig(out=str(out))))
    assert (summary.ingested, summary.skipped) == (0, 4)
    assert manifest.read(open_store(out)).num_rows == 21


def test_same_batch_name_with_other_inputs_is_refused(siim_dataset, shared_data, tmp_path):
    src = tmp_path / "other"
    src.mkdir()
    shutil.copy(next((shared_data / "siim" / "stage2_test").glob("*.dcm")), src / "a.dcm")
    cfg = SiimConfig(dicom_root=str(src), batch=BatchConfig(out=str(siim_dataset), batch="first"))
    with pytest.raises(ConfigError, match="already committed with other inputs"):
        ingest_siim(cfg)


def test_same_input_gives_the_same_bytes(shared_data, tmp_path):
    """The shards' bytes and the manifest's rows depend on the input only, not on the
    number of workers; only the attempt id in shard names (and the table log) differ."""

    def run(out: Path, workers: int) -> tuple[dict[str, bytes], list[dict]]:
        cfg = SiimConfig(
            dicom_root=str(shared_data / "siim" / "sample_images"),
            labels=shared_data / "siim" / "sample_images" / "train-rle-sample.csv",
            batch=BatchConfig(out=str(out), workers=workers, shard_max_samples=3),
        )
        summary = ingest_siim(cfg)
        attempt = {p.name.split("-")[2] for p in (out / "shards").rglob("*.tar")}
        assert len(attempt) == 1  # one attempt wrote every shard
        tag = f"-{attempt.pop()}-"
        shards = {
            p.relative_to(out).as_posix().replace(tag, "-"): p.read_bytes()
            for p in (out / "shards").rglob("*.tar")
        }
        rows = manifest.read(open_store(out)).to_pylist()
        for row in rows:
            row["shard"] = row["shard"].replace(tag, "-")
            assert row.pop("ingested_at").tzname() == "UTC"  # the one column that may differ
        assert summary.batch in {r["batch"] for r in rows}
        return shards, rows

    one, two = run(tmp_path / "a", 1), run(tmp_path / "b", 2)
    assert one[0].keys() == two[0].keys() and len(one[0]) >= 4
    assert one == two


def test_rows_and_batch_record_say_when_where_and_how(shared_data, tmp_path):
    """Provenance: every row has its commit time (UTC); the batch record names its sources
    (folder, files, bytes), the label file, the command, pneumo's version, user and host."""
    import getpass
    import json
    import socket
    import sys
    from datetime import datetime, timezone

    sample = shared_data / "siim" / "sample_images"
    labels = sample / "train-rle-sample.csv"
    out = tmp_path / "ds"
    before = datetime.now(timezone.utc)
    summary = ingest_siim(
        SiimConfig(dicom_root=str(sample), labels=labels, batch=BatchConfig(out=str(out)))
    )
    after = datetime.now(timezone.utc)
    rows = manifest.read(open_store(out)).to_pylist()
    times = {r["ingested_at"] for r in rows}
    assert len(times) == 1 and before <= times.pop() <= after
    record = json.loads((out / layout.batch_record("siim", summary.batch)).read_text())
    dicoms = list(sample.glob("*.dcm"))
    assert record["sources"]["roots"] == {
        str(sample): {"files": len(dicoms), "bytes": sum(p.stat().st_size for p in dicoms)}
    }
    assert record["sources"]["inputs"] == [str(labels)]
    assert record["command"][1:] == sys.argv[1:] and record["user"] == getpass.getuser()
    assert record["host"] == socket.gethostname() and record["pneumo_version"]
    assert record["version"] == summary.version and record["ingested"] == len(rows)
    empty = [d for d in out.rglob("*") if d.is_dir() and not any(d.iterdir())]
    assert [d for d in empty if not d.name.startswith(".")] == []  # no empty folder left
    committed = datetime.fromisoformat(record["committed_at"])
    assert before <= datetime.fromisoformat(record["started_at"]) <= committed <= after
