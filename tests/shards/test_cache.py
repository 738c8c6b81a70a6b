"""The node-local shard cache: a shard is downloaded once, by one process, and read from
local disk after; the least recently used go first; a killed or short download is never
served; a shard over the limit is read from the store; over S3 as over any store.

The remote store is a local folder (or moto's S3) behind a wrapper that counts what is
read through it, so "fetched nothing" is measured outside the cache, not taken from it.
Processes are forked: the cache's locks are file locks, shared by processes, not threads.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_datasets import small_s3_dataset

from pneumo.shards import manifest, stream
from pneumo.shards.cache import CachedStore, cached
from pneumo.shards.errors import ConfigError, IntegrityError, StoreError
from pneumo.shards.store import open_store

FORK = multiprocessing.get_context("fork")
SHARDS = [f"shards/siim/b0/siim-b0-train-neg-{i:06d}.tar" for i in range(4)]
SIZE = 10_000  # bytes of each shard


class Counting:
    """A store that counts the bytes and the opens read through it (across forks when
    given shared counters)."""

    def __init__(self, inner: Any, nbytes: Any = None, opens: Any = None) -> None:
        self.inner = inner
        self.nbytes = nbytes if nbytes is not None else FORK.Value("q", 0)
        self.opens = opens if opens is not None else FORK.Value("q", 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_read(self, path: str) -> io.RawIOBase:
        return self._counted(self.inner.open_read(path))

    def open_range(self, path: str, start: int, end: int) -> io.RawIOBase:
        return self._counted(self.inner.open_range(path, start, end))

    def _counted(self, stream_: Any) -> io.BufferedReader:
        with self.opens.get_lock():
            self.opens.value += 1
        data = stream_.read()
        stream_.close()
        with self.nbytes.get_lock():
            self.nbytes.value += len(data)
        return io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]


@pytest.fixture
def remote(tmp_path: Path) -> Counting:
    """Four shards of 10 kB (random bytes: the cache never looks inside) in a folder."""
    store = open_store(str(tmp_path / "remote"))
    rng = np.random.default_rng(0)
    for path in SHARDS:
        store.put(path, rng.bytes(SIZE))
    store.put("manifest/part.json", b"{}")
    return Counting(store)


def _copies(cache: CachedStore) -> set[str]:
    """The shards with a local copy."""
    return {p for p in SHARDS if cache.contains(p)}


def test_a_second_read_of_a_shard_fetches_nothing(remote: Counting, tmp_path: Path) -> None:
    cache = cached(remote, tmp_path / "cache", 10 * SIZE)
    whole = remote.inner.get(SHARDS[0])
    assert cache.get(SHARDS[0]) == whole
    assert (cache.stats.misses, cache.stats.hits, cache.stats.bytes_fetched) == (1, 0, SIZE)
    assert remote.nbytes.value == SIZE
    assert cache.open_range(SHARDS[0], 100, 2000).read() == whole[100:2000]
    assert cache.open_read(SHARDS[0]).read() == whole
    assert remote.nbytes.value == SIZE  # nothing more from the store
    assert (cache.stats.misses, cache.stats.hits, cache.stats.bytes_fetched) == (1, 2, SIZE)
    # Another cache on the same folder (another process's) finds the copy: nothing fetched.
    again = cached(remote, tmp_path / "cache", 10 * SIZE)
    assert again.open_range(SHARDS[0], 0, 10).read() == whole[:10]
    assert (again.stats.hits, again.stats.misses, remote.nbytes.value) == (1, 0, SIZE)


def test_objects_other_than_shards_are_the_stores_own(remote: Counting, tmp_path: Path) -> None:
    """The manifest and anything else can change: never cached. Writes go to the store."""
    cache = cached(remote, tmp_path / "cache", 10 * SIZE)
    for _ in range(2):
        assert cache.open_read("manifest/part.json").read() == b"{}"
    assert remote.nbytes.value == 4 and remote.opens.value == 2
    assert list((tmp_path / "cache" / "objects").iterdir()) == []
    cache.get(SHARDS[0])
    cache.delete(SHARDS[0])  # a shard deleted through the cache loses its copy too
    assert not remote.inner.exists(SHARDS[0]) and _copies(cache) == set()
    assert cache.list("shards") == SHARDS[1:] and cache.url == remote.url


def test_ranged_reads_from_the_cache_are_the_remote_bytes(remote: Counting, tmp_path: Path) -> None:
    cache = cached(remote, tmp_path / "cache", 10 * SIZE)
    cache.get(SHARDS[1])
    fetched = remote.nbytes.value

    whole = (tmp_path / "remote" / SHARDS[1]).read_bytes()

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(st.integers(0, SIZE + 50), st.integers(0, SIZE + 50), st.sampled_from([1, 7, -1]))
    def same_bytes(start: int, end: int, chunk: int) -> None:
        want = whole[start:end]
        got = cache.open_range(SHARDS[1], start, end)
        pieces = iter(lambda: got.read(chunk), b"") if chunk > 0 else [got.read()]
        assert b"".join(pieces) == want

    same_bytes()
    assert remote.nbytes.value == fetched


def test_the_least_recently_used_shard_is_evicted_first(remote: Counting, tmp_path: Path) -> None:
    """Room for three. Used in the order A B C A: D comes in and B, used longest ago, goes.
    Then B again: now C is the one used longest ago (C, A, D since)."""
    a, b, c, d = SHARDS
    cache = cached(remote, tmp_path / "cache", 3 * SIZE + 100)
    for path in (a, b, c, a):
        cache.open_range(path, 0, 10).read()
    assert _copies(cache) == {a, b, c}
    cache.get(d)
    assert _copies(cache) == {a, c, d}
    cache.get(b)
    assert _copies(cache) == {a, d, b}
    assert (cache.stats.misses, cache.stats.hits) == (5, 1)
    total = sum(p.stat().st_size for p in (tmp_path / "cache" / "objects").iterdir())
    assert total <= cache.limit_bytes


def test_a_copy_evicted_while_it_is_read_reads_to_its_end(remote: Counting, tmp_path: Path) -> None:
    """Eviction unlinks the file; an open descriptor keeps its bytes (POSIX)."""
    cache = cached(remote, tmp_path / "cache", SIZE)  # room for one
    reading = cache.open_range(SHARDS[0], 0, SIZE)
    first = reading.read(100)
    cache.get(SHARDS[1])  # evicts SHARDS[0]
    assert _copies(cache) == {SHARDS[1]}
    assert first + reading.read() == remote.inner.get(SHARDS[0])


def test_a_shard_larger_than_the_limit_is_read_through(remote: Counting, tmp_path: Path) -> None:
    cache = cached(remote, tmp_path / "cache", SIZE - 1)
    whole = remote.inner.get(SHARDS[2])
    assert cache.open_range(SHARDS[2], 10, 300).read() == whole[10:300]
    assert remote.nbytes.value == 290  # only the range, from the store
    assert cache.get(SHARDS[2]) == whole
    assert (cache.stats.read_through, cache.stats.misses, cache.stats.bytes_fetched) == (2, 0, 0)
    assert list((tmp_path / "cache" / "objects").iterdir()) == []


class _Short:
    """A store whose shard downloads end early without an error (a cut connection that
    looked like an end), while its size says the whole."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_read(self, path: str) -> io.BytesIO:
        return io.BytesIO(self.inner.get(path)[: SIZE // 2])


def test_a_short_download_is_not_cached(remote: Counting, tmp_path: Path) -> None:
    cache = cached(_Short(remote.inner), tmp_path / "cache", 10 * SIZE)
    for _ in range(2):  # tried again, failing again: never served from a copy
        with pytest.raises(StoreError, match=f"{SHARDS[0]}: the download ended after 5000 of"):
            cache.open_range(SHARDS[0], 0, 10)
    assert list((tmp_path / "cache" / "objects").iterdir()) == []
    assert list((tmp_path / "cache" / "partial").iterdir()) == []


class _Slow:
    """A store whose downloads take a while: long enough for a second reader to arrive."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_read(self, path: str) -> Any:
        time.sleep(0.3)
        return self.inner.open_read(path)


def _read_once(remote: Any, folder: Path, barrier: Any, results: Any) -> None:
    cache = cached(_Slow(remote), folder, 10 * SIZE)
    barrier.wait()
    data = cache.get(SHARDS[3])
    results.put((hashlib.sha256(data).hexdigest(), cache.stats.misses, cache.stats.hits))


def test_two_processes_reading_a_shard_download_it_once(remote: Counting, tmp_path: Path) -> None:
    barrier, results = FORK.Barrier(2), FORK.Queue()
    procs = [
        FORK.Process(target=_read_once, args=(remote, tmp_path / "cache", barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    got = [results.get(timeout=5) for _ in procs]
    assert remote.opens.value == 1 and remote.nbytes.value == SIZE
    assert {digest for digest, *_ in got} == {
        hashlib.sha256(remote.inner.get(SHARDS[3])).hexdigest()
    }
    assert sorted((misses, hits) for _, misses, hits in got) == [(0, 1), (1, 0)]


class _Stalling(io.RawIOBase):
    """Hands out the first half of the bytes, then says so and hangs (to be killed)."""

    def __init__(self, data: bytes, halfway: Any) -> None:
        super().__init__()
        self.data, self.halfway, self.given = data, halfway, False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if not self.given:
            self.given = True
            return self.data[: len(self.data) // 2]
        self.halfway.set()
        time.sleep(60)
        return b""


def _download_and_hang(remote: Any, folder: Path, halfway: Any) -> None:
    class Hanging:
        def __getattr__(self, name: str) -> Any:
            return getattr(remote, name)

        def open_read(self, path: str) -> _Stalling:
            return _Stalling(remote.get(path), halfway)

    cached(Hanging(), folder, 10 * SIZE).get(SHARDS[0])


def test_a_killed_download_is_never_served_and_is_cleaned_up(
    remote: Counting, tmp_path: Path
) -> None:
    folder = tmp_path / "cache"
    cache = cached(remote, folder, 10 * SIZE)  # opened before the kill: no sweep at opening
    halfway = FORK.Event()
    child = FORK.Process(target=_download_and_hang, args=(remote.inner, folder, halfway))
    child.start()
    assert halfway.wait(timeout=30)
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    assert len(list((folder / "partial").iterdir())) == 1  # what the killed download left
    assert cache.get(SHARDS[0]) == remote.inner.get(SHARDS[0])
    assert cache.stats.misses == 1
    assert list((folder / "partial").iterdir()) == []  # removed by the download after it

    # One left by a killed download of a shard not read again goes when a cache is opened.
    stale = folder / "partial" / f"{cache._target(SHARDS[1]).name}.0123456789abcdef.part"
    stale.write_bytes(b"half")
    cached(remote, folder, 10 * SIZE)
    assert not stale.exists()


def test_a_full_cache_disk_is_one_clear_error(
    remote: Counting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = cached(remote, tmp_path / "cache", 10 * SIZE)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    partial = tmp_path / "cache" / "partial"
    with pytest.raises(StoreError, match=f"cannot write the shard cache \\({partial}/.*: No space"):
        cache.get(SHARDS[0])
    assert list(partial.iterdir()) == [] and _copies(cache) == set()


def test_an_unusable_cache_folder_is_one_clear_error(remote: Counting, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match=f"cannot use {blocker / 'cache'} as a shard cache"):
        cached(remote, blocker / "cache", 10 * SIZE)
    with pytest.raises(ConfigError, match="limit must be positive"):
        cached(remote, tmp_path / "cache", 0)


# ---------------------------------------------------------------- over S3


@pytest.fixture
def s3_dataset(tmp_path: Path, write_shards, s3_bucket: str) -> tuple[Path, str]:
    """A dataset of 3 shards of 6 samples, written locally and uploaded: (folder, s3 URL)."""
    return small_s3_dataset(tmp_path / "ds", write_shards, s3_bucket, shards=3,
                            per_shard=6, seed=1, image_bytes=3000)  # fmt: skip


@pytest.mark.integration
def test_the_stream_over_s3_reads_each_shard_once(s3_dataset, tmp_path: Path) -> None:
    root, url = s3_dataset
    entries = stream.entries_from_table(manifest.read(open_store(str(root), create=False)))
    by_shard: dict[str, dict[str, stream.Entry]] = {}
    for e in entries:
        by_shard.setdefault(e.shard, {})[e.key] = e
    assert len(by_shard) == 3
    local = open_store(str(root), create=False)
    remote = Counting(open_store(url, create=False))
    cache = cached(remote, tmp_path / "cache", 10**6)

    def pieces() -> list[dict]:
        """Every shard read in pieces of two samples, each a ranged read."""
        out = []
        for shard, wanted in sorted(by_shard.items()):
            keys = sorted(wanted, key=lambda k: wanted[k].offset)
            for i in range(0, len(keys), 2):
                out += stream.read_shard(cache, shard, {k: wanted[k] for k in keys[i : i + 2]})
        return out

    want = [s for shard, wanted in sorted(by_shard.items())
            for s in stream.read_shard(local, shard, wanted)]  # fmt: skip
    shard_bytes = sum((root / shard).stat().st_size for shard in by_shard)
    for _ in range(2):
        got = pieces()
        assert [(s["__key__"], s["jpg"]) for s in got] == [(s["__key__"], s["jpg"]) for s in want]
        assert remote.nbytes.value == shard_bytes  # the first pass downloaded each shard once
    assert (cache.stats.misses, cache.stats.hits) == (3, 15)

    gone = sorted(by_shard)[0]  # a shard the manifest names, gone from S3 and from the cache
    cache.delete(gone)
    with pytest.raises(IntegrityError, match="does not exist"):
        list(stream.read_shard(cache, gone, by_shard[gone]))
