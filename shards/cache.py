"""Reading a remote store's shards fast: read-ahead, and a node-local cache of whole shards.

Read-ahead. With 20 ms to the first byte of every GET, a stream that opens one ranged read
after another waits 20 ms each time. :func:`read_ahead` hands a reader's runs of samples
on as they are, after telling the store (``Store.prefetch``) which byte ranges the next
ones will read; with :class:`ReadAhead` a store (``pneumo.shards.s3.S3Store``,
:class:`CachedStore`) starts those reads in a few threads and hands each over when it is
opened. The error of a read started early is raised where that read is opened, as if it
had started then: never earlier, and never lost.

The cache. Training reads every shard once per epoch. :func:`cached` wraps a remote store
so that the first read of a shard (a ``.tar`` object, see ``pneumo.shards.layout``)
downloads the whole object into a local folder, and every later read of it, whole or
ranged, reads that file. Shards never change once written (each ingest attempt names its
own), so a shard's URL is its key. Everything else (the manifest, writes, listings) is
the wrapped store's, as it is.

Several processes of a node share one cache folder (ranks and their loader workers):

* A shard is downloaded once: its download holds a lock (``fcntl.flock`` on one of 256 lock
  files, chosen by the key) that the others wait on; they then read the file it left.
* A download goes to a temp file in ``partial/``, is checked against the store's size,
  fsynced, and only then renamed into ``objects/``: a killed download leaves a temp file,
  never served, and removed by the next download of that shard (or the next cache opened
  on the folder).
* The least recently used shards are evicted to stay under ``limit_bytes``. Every use of a
  copy sets its mtime, so all processes see one order; eviction and admission happen under
  one lock for the folder. A reader opens a copy once and reads only through that open
  file: a copy evicted meanwhile stays readable through it (unlinking removes the name; the
  data stays until the last descriptor is closed), so eviction never cuts a read short.
  Such a file, and the temp files of downloads under way, are on disk beyond the limit
  for as long as they last.
* A shard larger than the limit is read from the store, uncached.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.store import FileRange, Store, create_temp
from pneumo.shards.tario import byte_ranges

log = logging.getLogger(__name__)

# Runs of samples announced before the one handed on. A run is often a piece of two
# samples (pneumo.shards.slots), one ranged read that a loader worker gets through in
# 7-30 ms, less than one time to first byte of S3 (20 ms and up). In
# benchmarks/bench_cache.py (one worker, +20 ms) 4 ahead fell behind (0.85 of the rate
# without the latency); 8 kept up, with room for slower answers.
READ_AHEAD_RUNS = 8
READ_AHEAD_THREADS = 8  # reads being opened at once, per store and process
READ_AHEAD_HELD = 32  # reads started and not taken (two class pools 8 ahead fit); beyond
# that the oldest is dropped
_CHUNK = 1024 * 1024


# ---------------------------------------------------------------- read-ahead


class ReadAhead:
    """Reads started before they are wanted, in a few threads, each taken once by its key.

    At most ``held`` are kept (started and not taken): beyond that the oldest is dropped
    (closed when done), so the announcements of a reader that stopped early cost nothing
    for long. A forked child starts afresh: its parent's threads are not in it.
    """

    def __init__(self, threads: int = READ_AHEAD_THREADS, held: int = READ_AHEAD_HELD) -> None:
        self.threads, self.held = threads, held
        self._lock = threading.Lock()
        self._pending: OrderedDict[Hashable, Future[Any]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    def start(self, key: Hashable, read: Callable[[], Any]) -> None:
        """Run ``read()`` in a thread, unless a read for ``key`` is waiting to be taken."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="read-ahead")
                self._pending.clear()
                self._pid = os.getpid()
            if key in self._pending:
                return
            self._pending[key] = self._pool.submit(read)
            while len(self._pending) > self.held:
                _drop(self._pending.popitem(last=False)[1])

    def take(self, key: Hashable) -> Future[Any] | None:
        """The read started for ``key`` (``result()`` waits for it, or raises its error)."""
        with self._lock:
            return self._pending.pop(key, None) if self._pid == os.getpid() else None


def _drop(future: Future[Any]) -> None:
    """Let go of a read nobody took: cancelled if not begun, else closed once done."""
    if not future.cancel():
        future.add_done_callback(_close_result)


def _close_result(future: Future[Any]) -> None:
    if future.exception() is None:
        close = getattr(future.result(), "close", None)
        if close is not None:
            close()


class Placed(Protocol):
    """A sample and where it lies (``pneumo.shards.slots.Entry`` is one)."""

    @property
    def shard(self) -> str: ...
    @property
    def offset(self) -> int | None: ...
    @property
    def size(self) -> int | None: ...


R = TypeVar("R", bound=Sequence[Placed])


def read_ahead(store: Store, runs: Iterable[R], depth: int = READ_AHEAD_RUNS) -> Iterator[R]:
    """``runs`` (each the samples of one shard that a reader reads next, in tar order)
    handed on as they are, each announced to ``store.prefetch`` ``depth`` runs before it is
    handed on: the store opens its reads while the runs before it are being read."""
    prefetch = getattr(store, "prefetch", None)  # a store without it reads as before
    ahead: deque[R] = deque()
    for run in runs:
        if prefetch is not None and run:
            prefetch(run[0].shard, _ranges(run))
        ahead.append(run)
        if len(ahead) > depth:
            yield ahead.popleft()
    yield from ahead


def _ranges(run: Sequence[Placed]) -> list[tuple[int, int]] | None:
    """The reads ``tario.read_samples`` makes of a run: one ranged read per stretch of
    adjacent samples; without spans (schema 1), the whole shard (None)."""
    spans = [(e.offset, e.size) for e in run]
    if any(offset is None or size is None for offset, size in spans):
        return None
    return byte_ranges(spans)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the cache


@dataclass
class CacheStats:
    """What a cache did for the reads of this process (each process counts its own)."""

    hits: int = 0  # reads of a copy that was there (or that another process downloaded)
    misses: int = 0  # reads whose shard this process downloaded
    read_through: int = 0  # reads of shards larger than the limit, from the store
    bytes_fetched: int = 0  # bytes downloaded from the store by this process


@dataclass(frozen=True)
class _Copy:
    """A shard's local copy, open (None: read it from the store), and how it was found."""

    file: IO[bytes] | None
    outcome: str  # "hits", "misses" or "read_through": the CacheStats field it counts in

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def is_shard(path: str) -> bool:
    """Whether the cache keeps ``path``: shards, the only objects that never change."""
    return path.endswith(".tar")


def cached(store: Store, cache_dir: str | os.PathLike[str], limit_bytes: int) -> CachedStore:
    """``store`` with its shards read through a local cache in ``cache_dir`` of at most
    ``limit_bytes`` (least recently used shards evicted), shared by every process of the
    node that opens the same folder. Give it to the stream, not to the manifest functions
    (they want the store itself: ``CachedStore.store``).

    Raises:
        ConfigError: ``limit_bytes`` is not positive.
        StoreError: ``cache_dir`` cannot be created or written; names it.
    """
    return CachedStore(store, cache_dir, limit_bytes)


class CachedStore:
    """A store whose shard reads come from local copies (see the module docstring); all
    else is the wrapped store's (``store``). ``stats`` counts this process's reads."""

    def __init__(self, store: Store, cache_dir: str | os.PathLike[str], limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ConfigError(f"the shard cache's limit must be positive, got {limit_bytes}")
        self.store, self.limit_bytes = store, limit_bytes
        self.url = store.url
        self.root = Path(cache_dir).expanduser().absolute()
        self.objects = self.root / "objects"  # the copies
        self.partial = self.root / "partial"  # downloads under way (or killed)
        self.locks = self.root / "locks"
        self.stats = CacheStats()
        self._stats_lock, self._pid = threading.Lock(), os.getpid()
        self._ahead = ReadAhead()
        self._too_large: set[str] = set()
        self._prepare()

    def _prepare(self) -> None:
        """Make the folders, check they can be written, remove temp files of killed downloads."""
        try:
            for folder in (self.objects, self.partial, self.locks):
                folder.mkdir(parents=True, exist_ok=True)
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise PermissionError(13, "Permission denied", str(folder))
            with self._locked("folder"):
                pass
            self._sweep()
        except OSError as e:
            where = e.filename or self.root
            raise StoreError(
                f"cannot use {self.root} as a shard cache ({where}: {e.strerror}); "
                "give a writable folder on local disk"
            ) from e

    # ------------------------------------------------------------ reads

    def open_read(self, path: str) -> IO[bytes]:
        copy = self._copy(path) if is_shard(path) else None
        return self.store.open_read(path) if copy is None else copy

    def open_range(self, path: str, start: int, end: int) -> IO[bytes]:
        copy = self._copy(path) if is_shard(path) else None
        if copy is None:
            return self.store.open_range(path, start, end)
        return FileRange(copy, start, end)  # type: ignore[return-value]

    def get(self, path: str) -> bytes:
        if not is_shard(path):
            return self.store.get(path)
        with closing(self.open_read(path)) as f:
            return f.read()

    def prefetch(self, path: str, ranges: Sequence[tuple[int, int]] | None) -> None:
        """Start fetching shard ``path`` into the cache (in a thread), or, for any other
        object, let the store start its reads."""
        if not is_shard(path) or path in self._too_large:
            self.store.prefetch(path, ranges)
        else:
            self._ahead.start(path, lambda: self._fetch(path))

    def _copy(self, path: str) -> IO[bytes] | None:
        """An open local copy of shard ``path``, fetched now if need be (or its fetch started
        by ``prefetch`` waited for); None: too large, read it from the store."""
        started = self._ahead.take(path)
        copy = started.result() if started is not None else self._fetch(path)
        self._count(copy.outcome, 1)
        if copy.file is not None:
            now = time.time_ns()
            os.utime(copy.file.fileno(), ns=(now, now))  # used now: last in line for eviction
        return copy.file

    def _fetch(self, path: str) -> _Copy:
        """Shard ``path``'s copy, downloaded if it is not there (any thread may run this)."""
        if path in self._too_large:
            return _Copy(None, "read_through")
        target = self._target(path)
        file = _open_if_there(target)
        if file is not None:
            return _Copy(file, "hits")
        with self._locked(target.name[:2]):
            file = _open_if_there(target)
            if file is not None:  # another process downloaded it while this one waited
                return _Copy(file, "hits")
            size = self.store.size(path)
            if size > self.limit_bytes:
                log.info("%s: %d bytes, over the cache's limit: not cached", path, size)
                self._too_large.add(path)
                return _Copy(None, "read_through")
            return _Copy(self._download(path, target, size), "misses")

    def _download(self, path: str, target: Path, size: int) -> IO[bytes]:
        """Download ``path`` to a temp file, check it, move it to ``target``; the file, open
        (before any eviction can remove it).

        Holds ``target``'s lock: no other download of it is under way, so temp files of
        its earlier downloads are left by killed ones.

        Raises:
            StoreError: the download failed or ended short, or the cache cannot be written.
        """
        for stale in self.partial.iterdir():
            if stale.name.startswith(f"{target.name}."):
                stale.unlink(missing_ok=True)
        try:
            fd, tmp = create_temp(self.partial, f"{target.name}.", ".part")
        except OSError as e:
            raise _unwritable(e, self.partial) from e
        file = None
        try:
            with os.fdopen(fd, "wb") as out, closing(self.store.open_read(path)) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    self._count("bytes_fetched", len(chunk))
                out.flush()
                os.fsync(out.fileno())  # renamed in only once its bytes are on disk
                got = out.tell()
            if got != size:
                raise StoreError(
                    f"{self.store.url_of(path)}: the download ended after {got} of its "
                    f"{size} bytes; nothing was cached (read it again)"
                )
            file = open(tmp, "rb")  # noqa: SIM115 - the caller's
            self._admit(Path(tmp), target, size)
        except BaseException as e:
            if file is not None:
                file.close()
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):  # the cache's disk (full, say): not the store
                raise _unwritable(e, tmp) from e
            raise
        log.debug("cached %s (%d bytes)", path, size)
        return file

    def _admit(self, tmp: Path, target: Path, size: int) -> None:
        """Evict the least recently used copies until ``size`` more bytes fit, then move
        ``tmp`` in as ``target``: under the folder's lock, one process at a time."""
        with self._locked("folder"):
            copies = []
            for entry in os.scandir(self.objects):
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                copies.append((stat.st_mtime_ns, entry.name, stat.st_size))
            total = sum(nbytes for *_, nbytes in copies)
            for _, name, nbytes in sorted(copies):  # oldest use first
                if total + size <= self.limit_bytes:
                    break
                (self.objects / name).unlink(missing_ok=True)
                total -= nbytes
                log.debug("evicted %s from the shard cache", name)
            now = time.time_ns()
            os.utime(tmp, ns=(now, now))
            os.replace(tmp, target)

    def _sweep(self) -> None:
        """Remove the temp files of killed downloads: those whose lock nobody holds."""
        for tmp in self.partial.iterdir():
            with self._locked(tmp.name[:2], wait=False) as free:
                if free:
                    tmp.unlink(missing_ok=True)

    def _target(self, path: str) -> Path:
        digest = hashlib.sha256(self.store.url_of(path).encode()).hexdigest()[:32]
        return self.objects / f"{digest}-{path.rsplit('/', 1)[-1]}"

    @contextmanager
    def _locked(self, name: str, wait: bool = True) -> Iterator[bool]:
        """Holds lock file ``name`` (yields False when ``wait`` is False and it is taken).

        ``flock`` locks belong to an open file: two threads of one process exclude each
        other as two processes do, and a killed process's locks are released with it.
        """
        fd = os.open(self.locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                held = True
            except BlockingIOError:
                held = False
            yield held
        finally:
            os.close(fd)  # releases the lock

    def _count(self, field: str, n: int) -> None:
        if self._pid != os.getpid():  # a forked child: a read-ahead thread may have held it
            self._stats_lock, self._pid = threading.Lock(), os.getpid()
        with self._stats_lock:
            setattr(self.stats, field, getattr(self.stats, field) + n)

    def contains(self, path: str) -> bool:
        """Whether shard ``path`` has a local copy now."""
        return self._target(path).exists()

    def delete(self, path: str) -> None:
        """Delete ``path`` from the store, and its local copy."""
        if is_shard(path):
            self._target(path).unlink(missing_ok=True)
        self.store.delete(path)

    def url_of(self, path: str) -> str:
        return self.store.url_of(path)

    def __getattr__(self, name: str) -> Any:
        """The rest is the store's own: writes, listings, ``exists``, ``size``, S3's tables."""
        if name == "store":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.store, name)


def _unwritable(e: OSError, where: str | Path) -> StoreError:
    """A write to the cache failed (a full disk names no file: ``where`` says which)."""
    return StoreError(
        f"cannot write the shard cache ({e.filename or where}: {e.strerror}); free some "
        "space or give another folder"
    )


def _open_if_there(path: Path) -> IO[bytes] | None:
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller's
    except FileNotFoundError:
        return None
