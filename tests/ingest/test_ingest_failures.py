"""Bad input is quarantined and the batch goes on; interrupted batches resume cleanly."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import manifest
from pneumo.shards.store import open_store
from pneumo.shards.tario import ShardUploader
from pneumo.shards.vacuum import vacuum

UID_POS = "1.2.276.0.7230010.3.1.4.8323329.4904.1517875185.355709"
UID_NEG = "1.2.276.0.7230010.3.1.4.8323329.10000.1517875220.938530"
UID_BAD_RLE = "1.2.276.0.7230010.3.1.4.8323329.1314.1517875167.222290"
UID_PAST_END = "1.2.276.0.7230010.3.1.4.8323329.4440.1517875182.865105"


@pytest.fixture
def messy_batch(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Real good files, the robustness DICOMs, and every kind of broken file and label."""
    src = tmp_path / "in" / "study" / "series"  # nested, like the Kaggle download
    src.mkdir(parents=True)
    sample = shared_data / "siim" / "sample_images"
    for uid in (UID_POS, UID_NEG, UID_BAD_RLE, UID_PAST_END):
        shutil.copy(sample / f"{uid}.dcm", src / f"{uid}.dcm")
    for p in (shared_data / "robustness").glob("*.dcm"):
        shutil.copy(p, src / p.name)
    good = (sample / f"{UID_NEG}.dcm").read_bytes()
    (src / "empty.dcm").write_bytes(b"")
    (src / "garbage.dcm").write_bytes(os.urandom(5000))
    (src / "truncated.dcm").write_bytes(good[: len(good) // 2])
    pixelless = pydicom.dcmread(sample / f"{UID_NEG}.dcm")
    del pixelless.PixelData
    pixelless.SOPInstanceUID = "1.2.3.999"
    pixelless.save_as(src / "pixelless.dcm")
    jpegls = pydicom.dcmread(sample / f"{UID_NEG}.dcm")
    jpegls.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # claims JPEG-LS: undecodable
    jpegls.SOPInstanceUID = "1.2.3.998"
    jpegls.save_as(src / "jpegls.dcm")
    labels = tmp_path / "labels.csv"
    rows = [
        "ImageId, EncodedPixels",
        f"{UID_POS}, 100 20 1000 30",
        f"{UID_NEG}, -1",
        f"{UID_BAD_RLE}, 12 x 7",
        f"{UID_PAST_END}, 1048000 1000",
        "1.2.3.4.never.came, -1",
    ]
    labels.write_text("\n".join(rows) + "\n")
    return tmp_path / "in", labels


def test_bad_inputs_go_to_quarantine_and_the_rest_is_stored(messy_batch, tmp_path):
    root, labels = messy_batch
    out = tmp_path / "ds"
    summary = ingest_siim(
        SiimConfig(dicom_root=str(root), labels=labels, batch=BatchConfig(out=str(out)))
    )
    store = open_store(out)
    stored = {r["image_id"]: r for r in manifest.read(store).to_pylist()}
    assert set(stored) >= {UID_POS, UID_NEG}
    assert stored[UID_POS]["has_ptx"] is True and stored[UID_NEG]["has_ptx"] is False
    robust = [r for r in stored.values() if r["image_format"] == "npy"]
    assert len(robust) == 2 and all(r["bit_depth"] == 16 for r in robust)
    assert UID_BAD_RLE not in stored and UID_PAST_END not in stored
    rows = manifest.read(store, table="quarantine").to_pylist()
    q = {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in rows}
    codes = {r["source"].rsplit("/", 1)[-1]: r["reason_code"] for r in rows}
    expected = {  # what each file is, by construction (see messy_batch)
        "empty.dcm": "empty-file",
        "garbage.dcm": "not-dicom",
        "truncated.dcm": "truncated",
        "pixelless.dcm": "no-pixels",
        "jpegls.dcm": "undecodable",
        f"{UID_BAD_RLE}.dcm": "bad-label",
        f"{UID_PAST_END}.dcm": "bad-label",
    }
    assert codes == expected, {n: (codes.get(n), q.get(n)) for n in expected}
    assert all(q[name].strip() for name in expected)
    assert "past" in q[f"{UID_PAST_END}.dcm"]
    # A label row whose image is in no batch is counted, not quarantined: a batch is often
    # a part of an archive whose label file covers all of it.
    assert summary.orphan_labels == 1
    assert summary.quarantined == len(q) == 7
    assert summary.ingested == 4


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("rerun_shard_size", [2, 20])
def test_an_interrupted_batch_is_invisible_then_resumes_without_duplicates(
    shared_data, tmp_path, monkeypatch, rerun_shard_size
):
    """Rerun with the same settings (finished shards kept) or another --shard-size (the
    interrupted attempt's shards are stale). The rerun never deletes a shard; what it does
    not use, and only that, is removed by vacuum."""
    out = tmp_path / "ds"
    cfg = SiimConfig(
        dicom_root=str(shared_data / "siim"),
        labels=shared_data / "siim" / "siim-pneumothorax-train-rle.csv.gz",
        batch=BatchConfig(out=str(out), batch="b1", shard_max_samples=2),
    )
    real_move = open_store(out).__class__.move_file
    calls = {"n": 0}

    def flaky_move(self, path, local_path):  # the store dies after 3 shards
        calls["n"] += 1
        if calls["n"] > 3:
            raise _Crash("store went away")
        return real_move(self, path, local_path)

    monkeypatch.setattr(open_store(out).__class__, "move_file", flaky_move)
    with pytest.raises(_Crash):
        ingest_siim(cfg)
    store = open_store(out)
    assert manifest.read(store).num_rows == 0  # nothing visible
    assert len(store.list("shards/")) == 3  # the leftovers of the crash
    left = set(store.list("shards/"))
    kept = vacuum(store, retention_hours=0)  # the batch can be resumed: its shards stay
    assert (kept.shards, kept.in_progress) == ([], 3) and set(store.list("shards/")) == left
    monkeypatch.undo()
    rerun = BatchConfig(out=str(out), batch="b1", shard_max_samples=rerun_shard_size)
    summary = ingest_siim(dataclasses.replace(cfg, batch=rerun))
    table = manifest.read(store)
    assert summary.ingested == table.num_rows == 21
    assert len(set(table.column("key").to_pylist())) == 21
    referenced = set(table.column("shard").to_pylist())
    listed = set(store.list("shards/"))
    assert referenced <= listed  # no dangling reference
    assert left <= listed  # nothing of the first attempt deleted by the rerun
    assert listed - referenced <= left  # the only orphans are the crashed attempt's
    if rerun_shard_size != 2:  # the premise: the rerun does not write every leftover name
        assert left - referenced
    assert vacuum(store, retention_hours=1).shards == []  # too young to remove
    removed = vacuum(store, retention_hours=0).shards
    assert set(removed) == listed - referenced
    assert set(store.list("shards/")) == referenced


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_consistent_dataset(tmp_path):
    from pneumo.synthetic.archives import write_siim_demo

    demo = write_siim_demo(tmp_path / "demo", n=40, seed=3, size=256)
    out = tmp_path / "ds"
    cmd = [
        sys.executable,
        "-m",
        "pneumo",
        "ingest",
        "siim",
        str(demo.image_root),
        "--labels",
        str(demo.labels_csv),
        "--out",
        str(out),
        "--shard-size",
        "2",
    ]
    killed_mid_batch = 0
    for shards_before_kill in (1, 5, 12):  # kill once that many shards are stored
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(out.glob("shards/**/*.tar"))) >= shards_before_kill:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_mid_batch += 1
        proc.wait()
        _assert_consistent(out)
    assert killed_mid_batch >= 2
    subprocess.run(cmd, check=True, capture_output=True)
    table = _assert_consistent(out)
    assert table.num_rows == 40 and len(set(table.column("key").to_pylist())) == 40


def _assert_consistent(out: Path):
    store = open_store(out)
    table = manifest.read(store)
    for shard in set(table.column("shard").to_pylist()):
        assert store.exists(shard)
    return table


def test_upload_errors_surface_before_commit(tmp_path):
    class Broken:
        def move_file(self, path, local):
            raise OSError("disk full")

    uploader = ShardUploader(Broken())  # type: ignore[arg-type]
    from pneumo.shards.tario import ShardWriter

    w = ShardWriter("shards/x.tar", str(tmp_path))
    w.write({"__key__": "a", "jpg": b"1"})
    uploader.submit(w)
    with pytest.raises(OSError, match="disk full"):
        uploader.wait()
