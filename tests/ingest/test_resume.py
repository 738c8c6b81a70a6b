"""A killed or failed batch resumes: finished chunks are kept, only the rest is redone;
a kill at each step of the commit, on a folder and on S3, then a rerun: every image once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

import pneumo.ingest.siim
from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.chunks import ChunkRecord
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import layout, manifest
from pneumo.shards.store import LocalStore, open_store


class _Crash(RuntimeError):
    pass


def _cfg(src: Path, labels: Path, out: str, **kw) -> SiimConfig:
    return SiimConfig(dicom_root=str(src), labels=labels, batch=BatchConfig(out=out, **kw))


def _without_attempt(shard: str) -> str:
    """``.../siim-b1-<attempt>-train-neg-000000.tar`` -> ``.../siim-b1-train-neg-000000.tar``."""
    folder, _, name = shard.rpartition("/")
    parts = name.split("-")
    return f"{folder}/{'-'.join(parts[:2] + parts[3:])}"


def _content(out: Path) -> tuple[dict[str, bytes], list[dict]]:
    """The committed rows and the bytes of the shards they name, attempt ids left out."""
    rows = manifest.read(open_store(out)).to_pylist()
    shards = {_without_attempt(r["shard"]): (out / r["shard"]).read_bytes() for r in rows}
    for row in rows:
        row["shard"] = _without_attempt(row["shard"])
        del row["ingested_at"]  # when, not what
    return shards, rows


def test_a_failed_batch_keeps_its_finished_chunks_and_redoes_only_the_rest(
    shared_data, tmp_path, monkeypatch
):
    sample = shared_data / "siim" / "sample_images"
    labels = sample / "train-rle-sample.csv"
    # One file per unit and shard, two units per chunk: 5 chunks of 2 shards.
    cfg = _cfg(sample, labels, str(tmp_path / "ds"), shard_max_samples=1, chunk_files=2)
    real_move = LocalStore.move_file
    moves = {"n": 0}

    def failing_move(self, path, local_path):  # the store fails at the 6th shard
        moves["n"] += 1
        if moves["n"] == 6:
            raise _Crash("store went away")
        return real_move(self, path, local_path)

    monkeypatch.setattr(LocalStore, "move_file", failing_move)
    with pytest.raises(_Crash):
        ingest_siim(cfg)
    monkeypatch.undo()
    out = tmp_path / "ds"
    store = open_store(out)
    assert manifest.read(store).num_rows == 0  # nothing visible
    records = [
        ChunkRecord.from_bytes(out.joinpath(p).read_bytes())
        for p in store.list("batches/")
        if p.endswith(".json.gz")
    ]
    assert [r.index for r in records] == [0, 1]  # chunk 2 failed
    kept = {p: os.stat(out / p) for r in records for p in r.shards}
    assert len(kept) == 4
    calls = {"n": 0}
    real_process = pneumo.ingest.siim._process

    def counting(ctx, src):
        calls["n"] += 1
        return real_process(ctx, src)

    monkeypatch.setattr(pneumo.ingest.siim, "_process", counting)
    summary = ingest_siim(cfg)
    assert summary.resumed_files == 4 and calls["n"] == 6  # only chunks 2, 3 and 4
    for path, before in kept.items():  # kept as they were, not written again
        now = os.stat(out / path)
        assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # The same bytes as a run that was never interrupted.
    clean = tmp_path / "clean"
    ingest_siim(_cfg(sample, labels, str(clean), shard_max_samples=1, chunk_files=2))
    assert _content(out) == _content(clean)
    assert summary.ingested == 10 and summary.shards == 10


# A child process that runs the ingest and SIGKILLs itself at one step of the commit:
# before the quarantine rows, before the batch record, before the rows' Delta commit,
# and after it (before the progress records are cleared).
_KILLER = r"""
import os, signal, sys
from pathlib import Path
from pneumo.ingest import chunks
from pneumo.shards import commits, s3 as s3mod, store as st

step, src, labels, out = sys.argv[1:5]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def is_record(path):
    return path.startswith("batches/") and path.endswith(".json") and "/" not in path[8:]

if step == "after-shards":
    commits.add_quarantine = die
if step == "at-record":
    for cls in (st.LocalStore, s3mod.S3Store):
        real_put = cls.put
        def put(self, path, data, real_put=real_put):
            if is_record(path):
                die()
            return real_put(self, path, data)
        cls.put = put
if step == "after-record":  # the samples table's commit never happens
    real_write, real_merge = commits.write_deltalake, commits.DeltaTable.merge
    def write(uri, *args, **kwargs):
        if str(uri).rstrip("/").endswith("manifest"):
            die()
        return real_write(uri, *args, **kwargs)
    def merge(self, *args, **kwargs):
        if self.table_uri.rstrip("/").endswith("manifest"):
            die()
        return real_merge(self, *args, **kwargs)
    commits.write_deltalake, commits.DeltaTable.merge = write, merge
if step == "after-commit":
    chunks.discard = die

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
ingest_siim(SiimConfig(dicom_root=src, labels=Path(labels),
                       batch=BatchConfig(out=out, shard_max_samples=2)))
sys.exit(3)
"""


@pytest.mark.integration
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("step", ["after-shards", "at-record", "after-record", "after-commit"])
def test_a_kill_at_each_commit_step_then_a_rerun_commits_every_image_once(
    shared_data, tmp_path, request, where, step
):
    sample = shared_data / "siim" / "sample_images"
    src = tmp_path / "src"
    src.mkdir()
    uids = [p.stem for p in sorted(sample.glob("*.dcm"))[:4]]
    for uid in uids:
        shutil.copy(sample / f"{uid}.dcm", src / f"{uid}.dcm")
    rows = (sample / "train-rle-sample.csv").read_text(encoding="utf-8-sig").splitlines()
    labels = tmp_path / "labels.csv"  # the real rows of these four images
    labels.write_text("\n".join(r for r in rows if r.split(",")[0] in uids) + "\n")
    (src / "garbage.dcm").write_bytes(b"not a dicom")  # one quarantine row
    out = str(tmp_path / "ds") if where == "local" else request.getfixturevalue("s3_bucket") + "/ds"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, step, str(src), str(labels), out],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = open_store(out)
    if step == "after-commit":
        assert manifest.read(store).num_rows == 4  # committed, then killed
        summary = ingest_siim(_cfg(src, labels, out, shard_max_samples=2))
        assert summary.already_committed
    else:
        assert manifest.read(store).num_rows == 0
        assert manifest.read(store, table="quarantine").num_rows == 0  # only at commit
        if step in ("at-record", "after-record"):
            assert store.list("quarantine/")  # written, but not visible
        summary = ingest_siim(_cfg(src, labels, out, shard_max_samples=2))
        assert summary.committed and summary.resumed_files == 5
    table = manifest.read(store)
    assert sorted(table.column("image_id").to_pylist()) == sorted(uids)
    quarantined = manifest.read(store, table="quarantine").column("source").to_pylist()
    assert [s.rsplit("/", 1)[-1] for s in quarantined] == ["garbage.dcm"]
    shards = set(store.list("shards/"))
    assert set(table.column("shard").to_pylist()) == shards  # no orphan, none dangling
    batch = summary.batch
    assert not store.list(layout.batch_progress_prefix("siim", batch))
    if where == "s3":
        bucket = out.removeprefix("s3://").split("/")[0]
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    else:
        assert not [p for p in Path(out).rglob("*.tmp")]
    assert ingest_siim(_cfg(src, labels, out, shard_max_samples=2)).already_committed
