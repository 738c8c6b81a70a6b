"""Input files of a batch (a local folder or an ``s3://`` prefix) and the worker pool.

Workers only decode: each returns a ready sample (or a rejection) for one file, in input
order, and the parent process writes the shards. Keeping the writing in one place keeps the
shard bytes deterministic whatever ``--workers`` is.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.pool
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.store import Store, is_s3_url, open_store

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class SourceFile:
    """One input file: ``root`` is a folder or an ``s3://`` prefix, ``rel`` its path in it."""

    root: str
    rel: str
    size: int

    @property
    def name(self) -> str:
        return f"{self.root.rstrip('/')}/{self.rel}"


def list_sources(root: str, suffixes: Sequence[str]) -> list[SourceFile]:
    """Every file under ``root`` (any depth) whose name ends with one of ``suffixes``.

    Raises:
        ConfigError: the folder does not exist.
    """
    wanted = tuple(s.lower() for s in suffixes)
    if is_s3_url(root):
        store = open_store(root)
        rels = [r for r in store.list("") if r.lower().endswith(wanted)]
        # Listing already gave the sizes on S3, but a second round trip per file would be
        # slow: sizes only feed the batch name, so the key list is enough there.
        return [SourceFile(root, r, 0) for r in rels]
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"{root} is not a folder")
    out: list[SourceFile] = []
    # os.scandir, not os.walk + Path: a listing of a SIIM folder (one folder per study and
    # series) was a sixth of a one-worker ingest, all of it before the workers start.
    pending = [(str(base), "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():  # as os.walk: a link to a folder is not walked into
                    if not entry.is_symlink():
                        pending.append((entry.path, f"{prefix}{entry.name}/"))
                elif entry.name.lower().endswith(wanted):  # any other entry, as os.walk
                    out.append(SourceFile(str(base), prefix + entry.name, entry.stat().st_size))
    return sorted(out, key=lambda s: s.rel)


def take_part(
    files: Sequence[SourceFile], part: tuple[int, int] | None
) -> tuple[list[SourceFile], list[SourceFile]]:
    """Part ``I`` of ``N`` of a sorted listing (``--part I/N``: the I-th of N contiguous,
    near-equal runs) and the files of the other parts. The same listing always splits the
    same way, so N pods of an Indexed Job each ingest one part, every file exactly once."""
    if part is None:
        return list(files), []
    index, count = part
    start, end = len(files) * index // count, len(files) * (index + 1) // count
    return list(files[start:end]), list(files[:start]) + list(files[end:])


_stores: dict[str, Store] = {}


def read_source(src: SourceFile) -> bytes:
    """The file's bytes (one store client per process for S3 roots).

    Raises:
        StoreError: the file cannot be read, in one line naming it and the store's answer:
            an S3 error after retries (refused or expired credentials, throttling, the
            endpoint gone), an I/O or permission error of a local file, or a listed file
            that is gone (deleted or moved since the listing).
    """
    try:
        if not is_s3_url(src.root):
            return (Path(src.root) / src.rel).read_bytes()
        if src.root not in _stores:
            _stores[src.root] = open_store(src.root)
        return _stores[src.root].get(src.rel)
    except FileNotFoundError as e:
        raise StoreError(f"{src.name} was listed but is gone (deleted or moved?)") from e
    except OSError as e:
        raise StoreError(f"cannot read {src.name}: {e.strerror or e}") from e


def read_input(src: SourceFile) -> bytes:
    """``read_source`` for a batch: a file that cannot be read is a failure of the store,
    never of its content, so it is not quarantined. The batch stops (the error travels out
    of the worker process to the parent) with nothing of it committed, and the same command
    run again resumes it. A file gone since the listing stops it too: the batch, named by
    its listing, no longer matches what is there, and the next run lists it afresh.

    Raises:
        StoreError: as ``read_source``, saying what to do next.
    """
    try:
        return read_source(src)
    except StoreError as e:
        raise StoreError(f"{e}; {_STOPPED}") from e


_STOPPED = "the batch stopped, nothing was quarantined: run the same command again to resume it"


def run_ordered(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """``map(fn, items)`` in input order, on ``workers`` processes (1: in this process)."""
    if workers <= 1 or len(items) <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    # fork: workers inherit the parsed label tables without pickling them.
    chunk = max(1, min(16, len(items) // (workers * 8)))
    # Workers are born with Ctrl-C and SIGTERM held, until _init_worker has set them up.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENTS_SIGNALS)
    try:
        pool = _fork_pool(workers, (os.getpid(), initializer, initargs))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    with pool:
        yield from pool.imap(fn, items, chunksize=chunk)


# Ctrl-C and SIGTERM are the parent's: it stops (one line, see pneumo.render) and terminates
# the pool, whose workers ignore both. Ctrl-C reaches every process of the terminal's group,
# SIGTERM every process of the group when the whole group is killed (timeout, systemd,
# Slurm): a worker that died of it could hold a lock of the pool's queues, which the
# parent's terminate then waits for forever, and one that took the parent's handler it
# inherited would print a traceback. The pool kills its workers instead (SIGKILL), and
# Linux kills them when the parent dies.
_PARENTS_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _fork_pool(workers: int, setup: tuple[Any, ...]) -> multiprocessing.pool.Pool:
    """A pool of forked workers that its terminate kills (SIGKILL: they ignore SIGTERM)."""
    ctx = mp.get_context("fork")  # made here: there is no fork on Windows

    class Worker(ctx.Process):  # type: ignore[name-defined]
        def terminate(self) -> None:
            self.kill()

    class Pool(multiprocessing.pool.Pool):
        @staticmethod
        def Process(ctx: Any, *args: Any, **kwds: Any) -> Any:  # noqa: N802 - Pool's name
            return Worker(*args, **kwds)

    return Pool(workers, _init_worker, setup, context=ctx)


def _init_worker(
    parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stop_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENTS_SIGNALS)
    if initializer is not None:
        initializer(*initargs)


def _stop_with_parent(parent: int) -> None:
    """Have Linux kill this worker when the parent dies, even by SIGKILL, rather than
    leave it decoding for no one (and print a BrokenPipeError when it hands over)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no libc to ask: the worker ends at its next hand-over
        return
    if os.getppid() != parent:  # it died before the request
        os._exit(0)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
