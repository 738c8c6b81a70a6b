"""Many writers into one dataset: every image committed once, no attempt's files lost.

Real ``pneumo ingest`` processes run at the same time (local folder and S3); what they
left is read back with an independent reader (the Delta log replayed by hand, the tars
opened with tarfile: ``tests/table_reader.py``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from table_reader import check_samples, current_rows

from pneumo.shards import layout, manifest
from pneumo.shards.store import open_store
from pneumo.shards.vacuum import vacuum
from pneumo.synthetic.archives import write_siim_demo

N_IMAGES = 24


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[list[Path], Path]:
    """24 small SIIM-style DICOMs and their label file."""
    root = tmp_path_factory.mktemp("concurrent") / "demo"
    write_siim_demo(root, n=N_IMAGES, seed=11, size=64)
    return sorted(root.rglob("*.dcm")), root / "train-rle.csv"


def _folder(files: list[Path], out: Path) -> Path:
    out.mkdir(parents=True)
    for f in files:
        shutil.copy(f, out / f.name)
    return out


def _start(src: Path, labels: Path, out: str, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "pneumo", "ingest", "siim", str(src), "--out", out]
    cmd += ["--labels", str(labels), "--shard-size", "4", *extra]
    env = {**os.environ, "PNEUMO_PATIENT_KEY": "a-test-secret-for-concurrent-writers"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _exactly_once(out: str, expected_ids: set[str]) -> list[dict]:
    store = open_store(out)
    rows = current_rows(store)
    ids = [r["image_id"] for r in rows]
    assert sorted(ids) == sorted(expected_ids), "an image is missing or committed twice"
    assert len({r["content_sha256"] for r in rows}) == len(rows)  # no pixels twice either
    assert check_samples(store, rows) == []
    return rows


@pytest.mark.integration
@pytest.mark.parametrize(
    ("where", "writers"),
    [("local", 2), ("local", 4), pytest.param("s3", 2, marks=pytest.mark.slow)],
)
def test_overlapping_writers_commit_every_image_once(archive, tmp_path, request, where, writers):
    files, labels = archive
    # Writer i takes 12 files starting at 4*i: each shares files with its neighbours.
    sources = [_folder(files[4 * i : 4 * i + 12], tmp_path / f"src{i}") for i in range(writers)]
    out = str(tmp_path / "ds") if where == "local" else request.getfixturevalue("s3_bucket")
    procs = [_start(src, labels, out) for src in sources]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    expected = {f.stem for i in range(writers) for f in files[4 * i : 4 * i + 12]}
    rows = _exactly_once(out, expected)
    # The counts each writer reported add up to what is stored.
    ingested = sum(int(out_.split("ingested ")[1].split()[0]) for out_, _ in results)
    assert ingested == len(rows)
    # One split policy: every row was split by the same one (patients are images here).
    policies = {r["split"] for r in rows}  # noqa: the split of each image is a function of its key and the one policy
    assert policies <= {"train", "val", "test"}


@pytest.mark.integration
def test_the_same_files_in_two_batches_at_once_are_stored_once(archive, tmp_path):
    """Two batches (two --batch names) of the same files, written at once: each image once."""
    files, labels = archive
    a = _folder(files[:6], tmp_path / "a")
    b = _folder(files[:6], tmp_path / "b")
    out = str(tmp_path / "ds")
    procs = [_start(a, labels, out, "--batch", "one"), _start(b, labels, out, "--batch", "two")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    _exactly_once(out, {f.stem for f in files[:6]})


_SLOW_INGEST = r"""
import sys, time
from pathlib import Path
import pneumo.ingest.siim as siim
real = siim._process
def slow(ctx, src):
    time.sleep(0.15)
    return real(ctx, src)
siim._process = slow
from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
src, labels, out = sys.argv[1:4]
print("started", flush=True)
ingest_siim(SiimConfig(dicom_root=src, labels=Path(labels),
                       batch=BatchConfig(out=out, batch="b1", shard_max_samples=2, chunk_files=2)))
print("committed", flush=True)
"""


def _slow(src: Path, labels: Path, out: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PNEUMO_PATIENT_KEY": "a-test-secret-for-concurrent-writers"}
    return subprocess.Popen(
        [sys.executable, "-c", _SLOW_INGEST, str(src), str(labels), out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_chunks(out: Path, n: int, proc: subprocess.Popen[str]) -> None:
    progress = out / layout.batch_progress_prefix("siim", "b1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len(list(progress.glob("chunk-*.json.gz"))) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError(f"no {n} chunk records within 120 s")


@pytest.mark.integration
@pytest.mark.parametrize("chunks_before_kill", [0, 2])
def test_the_same_batch_twice_refuses_then_takes_over_from_a_dead_attempt(
    archive, tmp_path, chunks_before_kill
):
    files, labels = archive
    src = _folder(files[:12], tmp_path / "src")
    out = tmp_path / "ds"
    first = _slow(src, labels, str(out))
    if chunks_before_kill:
        _wait_for_chunks(out, chunks_before_kill, first)
    else:  # as soon as it holds the lease
        _wait_for_lease(out, first)
    # The same command while the first runs: one line, exit 1, nothing of the first touched.
    before = sorted(p.name for p in out.rglob("*.tar"))
    second = _start(src, labels, str(out), "--batch", "b1", "--shard-size", "2")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1, err
    (line,) = [x for x in err.strip().splitlines() if not x.startswith("warning:")]
    assert line.startswith("error: ") and "is being written by attempt" in line
    assert set(before) <= {p.name for p in out.rglob("*.tar")}
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    left = {p.relative_to(out).as_posix() for p in (out / "shards").rglob("*.tar")}
    # Now it takes over without any clean-up by hand, and commits every image once.
    third = _start(src, labels, str(out), "--batch", "b1", "--shard-size", "2")
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    rows = _exactly_once(str(out), {f.stem for f in files[:12]})
    listed = {p.relative_to(out).as_posix() for p in (out / "shards").rglob("*.tar")}
    assert left <= listed  # the dead attempt's files were not deleted by the takeover
    referenced = {r["shard"] for r in rows}
    assert vacuum(open_store(out), retention_hours=0).shards == sorted(listed - referenced)
    assert {p.relative_to(out).as_posix() for p in (out / "shards").rglob("*.tar")} == referenced
    assert not list(out.rglob("*.tmp"))
    assert not list((out / ".scratch").iterdir())  # the dead attempt's scratch is gone too


def _wait_for_lease(out: Path, proc: subprocess.Popen[str]) -> None:
    lease = out / layout.lease_path("siim", "b1", 0)
    deadline = time.monotonic() + 120
    while not lease.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the first attempt never took its lease"
        time.sleep(0.02)


@pytest.mark.integration
def test_part_i_of_n_ingests_one_archive_together(archive, tmp_path):
    """Three pods of an Indexed Job, one part each: every file once, in three batches."""
    files, labels = archive
    src = _folder(files, tmp_path / "src")
    out = str(tmp_path / "ds")
    procs = [_start(src, labels, out, "--part", f"{i}/3", "--batch", "job") for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    rows = _exactly_once(out, {f.stem for f in files})
    assert {r["batch"] for r in rows} == {"job-0of3", "job-1of3", "job-2of3"}
    assert manifest.read(open_store(out), table="quarantine").num_rows == 0  # no orphans


def test_part_index_reads_the_pod_index_of_an_indexed_job(monkeypatch):
    from pneumo.commands.ingest import _parse_part
    from pneumo.shards.errors import ConfigError

    assert _parse_part("2/5") == (2, 5)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "4")
    assert _parse_part("index/5") == (4, 5)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    for bad in ("index/5", "3", "a/b"):
        with pytest.raises(ConfigError, match="--part"):
            _parse_part(bad)


def test_parts_split_a_listing_into_contiguous_runs_covering_it_once():
    from pneumo.ingest.sources import take_part

    listing = list(range(10))
    for n in (1, 3, 4, 10, 12):
        parts = [take_part(listing, (i, n)) for i in range(n)]
        assert sum((mine for mine, _ in parts), []) == listing  # each once, in order
        assert all(sorted(mine + others) == listing for mine, others in parts)
        assert max(len(m) for m, _ in parts) - min(len(m) for m, _ in parts) <= 1
