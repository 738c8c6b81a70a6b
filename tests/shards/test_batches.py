"""Batches can be listed and dropped: atomically, resumably, and on S3 without touching a
batch whose name merely starts the same way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import batches, commits, layout, manifest
from pneumo.shards.errors import ConfigError
from pneumo.shards.s3 import S3Store
from pneumo.shards.store import LocalStore, open_store


def _sources(shared_data: Path, tmp_path: Path) -> dict[str, Path]:
    """Two folders of sample DICOMs; the first also holds a file that is quarantined."""
    dicoms = sorted((shared_data / "siim" / "sample_images").glob("*.dcm"))
    out = {}
    for name, chunk in (("b1", dicoms[:5]), ("b10", dicoms[5:])):
        folder = tmp_path / name
        folder.mkdir()
        for p in chunk:
            shutil.copy(p, folder / p.name)
        out[name] = folder
    (out["b1"] / "garbage.dcm").write_bytes(b"not a dicom")
    return out


def _ingest(src: Path, out: str, batch: str):
    return ingest_siim(SiimConfig(dicom_root=str(src), batch=BatchConfig(out=out, batch=batch)))


@pytest.fixture(params=["local", "s3"])
def dataset(request, shared_data, tmp_path) -> tuple[str, dict[str, Path]]:
    src = _sources(shared_data, tmp_path)
    if request.param == "local":
        out = str(tmp_path / "ds")
    else:
        out = request.getfixturevalue("s3_bucket") + "/ds"
    for name, folder in src.items():
        _ingest(folder, out, name)
    return out, src


def _ids(store, batch: str | None = None) -> list[str]:
    rows = manifest.read(store).to_pylist()
    return sorted(r["image_id"] for r in rows if batch is None or r["batch"] == batch)


def test_list_shows_each_batch_with_its_counts(dataset):
    out, _ = dataset
    listed = {b.batch: b for b in batches.list_batches(open_store(out))}
    assert set(listed) == {"b1", "b10"}
    assert (listed["b1"].state, listed["b1"].images, listed["b1"].quarantined) == (
        "committed",
        5,
        1,
    )
    assert listed["b10"].images == 5 and listed["b10"].quarantined == 0
    assert listed["b1"].shards >= 1


def test_drop_removes_one_batch_and_its_images_can_come_back(dataset):
    out, src = dataset
    store = open_store(out)
    b10_shards = store.list(layout.batch_shard_prefix("siim", "b10"))
    b10_ids = _ids(store, "b10")
    summary = batches.drop_batch(store, *batches.find_batch(store, "b1"))
    assert (summary.images, summary.was) == (5, "committed")
    assert _ids(store) == b10_ids
    assert manifest.read(store, table="quarantine").num_rows == 0
    assert store.list(layout.batch_shard_prefix("siim", "b10")) == b10_shards  # untouched
    assert not store.list(layout.batch_shard_prefix("siim", "b1"))
    assert not store.exists(layout.batch_record("siim", "b1"))
    assert [b.batch for b in batches.list_batches(store)] == ["b10"]
    again = _ingest(src["b1"], out, "b1")
    assert (again.ingested, again.skipped) == (5, 0)  # not skipped as duplicates


def test_an_interrupted_drop_is_invisible_at_once_and_finishes_when_run_again(dataset, monkeypatch):
    out, src = dataset
    store = open_store(out)
    cls = type(store)
    real_delete = cls.delete

    def failing_delete(self, path):  # dies at the first shard, after the manifest part
        if path.startswith("shards/"):
            raise OSError("connection lost")
        return real_delete(self, path)

    monkeypatch.setattr(cls, "delete", failing_delete)
    with pytest.raises(OSError):
        batches.drop_batch(store, "siim", "b1")
    monkeypatch.undo()
    # One step made the batch's samples and its quarantine rows disappear together.
    assert "b1" not in {r["batch"] for r in manifest.read(store).to_pylist()}
    assert manifest.read(store, table="quarantine").num_rows == 0
    states = {b.batch: b.state for b in batches.list_batches(store)}
    assert states == {"b1": "dropping", "b10": "committed"}
    with pytest.raises(ConfigError, match="being dropped"):
        _ingest(src["b1"], out, "b1")
    summary = batches.drop_batch(store, "siim", "b1")
    assert summary.was == "dropping" and summary.shards >= 1
    assert [b.batch for b in batches.list_batches(store)] == ["b10"]
    leftovers = [p for p in store.list() if "b1/" in p or "-b1." in p or "=b1/" in p]
    assert leftovers == []


def test_an_interrupted_ingest_is_listed_and_can_be_dropped(shared_data, tmp_path, monkeypatch):
    src = _sources(shared_data, tmp_path)
    out = str(tmp_path / "ds")

    def no_commit(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(commits, "commit", no_commit)
    with pytest.raises(OSError):
        _ingest(src["b1"], out, "b1")
    monkeypatch.undo()
    store = open_store(out)
    (info,) = batches.list_batches(store)
    assert (info.batch, info.state, info.images) == ("b1", "interrupted", None)
    batches.drop_batch(store, "siim", "b1")
    assert batches.list_batches(store) == [] and store.list("shards/") == []


def test_cli_list_and_drop(dataset, pneumo):
    out, _ = dataset
    text = pneumo("batch", "list", out).stdout
    assert "b1 " in text and "b10" in text and "committed" in text
    proc = pneumo("batch", "drop", out, "siim/b10")
    assert "dropped batch siim/b10 (committed): 5 images" in proc.stdout
    proc = pneumo("batch", "drop", out, "nope", check=False)
    assert proc.returncode == 1 and "no batch 'nope'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert isinstance(open_store(out), (LocalStore, S3Store))
