"""Read-ahead: the runs a reader announces are opened early, in a few threads, and handed
over as they are read: the same samples, in the same order, as reading one run after
another; the error of a read started early is raised when that read is reached (never
earlier, and never swallowed), as it would have been without read-ahead.

Runs are pieces of two samples from anywhere in the dataset, the way the training stream
reads them, each one ranged GET on moto's S3.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stream_datasets import small_s3_dataset

from pneumo.shards import cache, manifest, s3_reads, stream
from pneumo.shards.cache import ReadAhead, read_ahead
from pneumo.shards.errors import IntegrityError
from pneumo.shards.store import open_store


@pytest.fixture
def s3_dataset(tmp_path: Path, write_shards, s3_bucket: str) -> tuple[Path, str]:
    """3 shards of 8 samples, written locally and uploaded: (folder, s3 URL)."""
    return small_s3_dataset(tmp_path / "ds", write_shards, s3_bucket, shards=3,
                            per_shard=8, seed=2, image_bytes=2000)  # fmt: skip


def _runs(root: Path) -> list[list[stream.Entry]]:
    """Every sample in pieces of two adjacent ones, the pieces in a shuffled order."""
    entries = stream.entries_from_table(manifest.read(open_store(str(root), create=False)))
    runs = [entries[i : i + 2] for i in range(0, len(entries), 2)]  # sorted: shard, offset
    order = np.random.default_rng(0).permutation(len(runs))
    return [runs[i] for i in order]


def _read(store: Any, runs: Any) -> Iterator[tuple[str, bytes]]:
    for run in runs:
        for sample in stream.read_shard(store, run[0].shard, {e.key: e for e in run}):
            yield sample["__key__"], sample["jpg"]


@pytest.fixture
def gets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, str]]:
    """Every GET the S3 store makes: (thread name, first byte, outcome)."""
    made: list[tuple[str, int, str]] = []
    original = s3_reads.ResumingReader._open

    def spy(self: Any) -> Any:
        try:
            body = original(self)
        except Exception as e:
            made.append((threading.current_thread().name, self.start, type(e).__name__))
            raise
        made.append((threading.current_thread().name, self.start, "ok"))
        return body

    monkeypatch.setattr(s3_reads.ResumingReader, "_open", spy)
    return made


@pytest.mark.integration
def test_read_ahead_hands_over_the_sequential_bytes_in_order(s3_dataset, gets) -> None:
    root, url = s3_dataset
    runs = _runs(root)
    sequential = list(_read(open_store(url, create=False), runs))
    assert len(sequential) == 24 and all(name == "MainThread" for name, *_ in gets)
    gets.clear()
    store = open_store(url, create=False)
    assert list(_read(store, read_ahead(store, runs))) == sequential
    assert len(gets) == len(runs)  # one GET a run, each made once,
    assert all(name.startswith("read-ahead") for name, *_ in gets)  # all of them ahead
    # A local folder has nothing to hide: the same samples, nothing started.
    local = open_store(str(root), create=False)
    assert list(_read(local, read_ahead(local, runs))) == sequential


@pytest.mark.integration
def test_an_error_ahead_is_raised_when_its_run_is_read(s3_dataset, gets) -> None:
    """The fourth run's range starts past its shard's end (a shard shorter than the
    manifest says): S3 refuses the GET (416) in a read-ahead thread while the first runs
    are read; the stream gets every sample before it, then the damage, named."""
    root, url = s3_dataset
    runs = _runs(root)
    shard_size = (root / runs[3][0].shard).stat().st_size
    runs[3] = [e._replace(offset=shard_size + 512 * i) for i, e in enumerate(runs[3])]
    store = open_store(url, create=False)
    delivered = []
    with pytest.raises(IntegrityError, match=f"ends before sample {runs[3][0].key}"):
        for key, _ in _read(store, read_ahead(store, runs)):
            delivered.append(key)
    assert delivered == [e.key for run in runs[:3] for e in run]
    refused = [(name, start) for name, start, outcome in gets if outcome != "ok"]
    assert refused == [(refused[0][0], shard_size)]  # once, ahead: its error is the one raised
    assert refused[0][0].startswith("read-ahead")


@pytest.mark.integration
def test_the_cache_fetches_the_announced_shards_ahead(s3_dataset, gets, tmp_path) -> None:
    root, url = s3_dataset
    runs = _runs(root)
    sequential = list(_read(open_store(str(root), create=False), runs))
    gets.clear()
    store = cache.cached(open_store(url, create=False), tmp_path / "cache", 10**6)
    assert list(_read(store, read_ahead(store, runs))) == sequential
    assert len(gets) == 3 and all(name.startswith("read-ahead") for name, *_ in gets)
    assert (store.stats.misses, store.stats.hits) == (3, len(runs) - 3)


class _Closing:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_reads_announced_beyond_what_is_held_drop_the_oldest() -> None:
    ahead = ReadAhead(threads=2, held=3)
    results = [_Closing() for _ in range(4)]
    for i, result in enumerate(results):
        ahead.start(i, lambda r=result: r)
    ahead.start(3, lambda: pytest.fail("started twice"))  # already waiting: not again
    assert ahead.take(0) is None  # dropped for the fourth, and closed once done
    assert [ahead.take(i).result() for i in (1, 2, 3)] == results[1:]  # type: ignore[union-attr]
    assert ahead.take(1) is None  # taken once
    ahead._pool.shutdown(wait=True)  # type: ignore[union-attr]
    assert [r.closed for r in results] == [True, False, False, False]


def test_an_error_of_a_read_ahead_is_raised_by_result_only() -> None:
    ahead = ReadAhead()

    def refused() -> None:
        raise OSError("refused")

    ahead.start("k", refused)  # no error here
    future = ahead.take("k")
    assert future is not None
    with pytest.raises(OSError, match="refused"):
        future.result()
