"""Input files of a batch (a local folder or an ``s3://`` prefix) and the worker pool.

Workers only decode: each returns a ready sample (or a rejection) for one file, in input
order, and the parent process writes the shards. Keeping the writing in one place keeps the
shard bytes deterministic whatever ``--workers`` is.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pneumo.shards.errors import ConfigError
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


_stores: dict[str, Store] = {}


def read_source(src: SourceFile) -> bytes:
    """The file's bytes (one store client per process for S3 roots)."""
    if not is_s3_url(src.root):
        return (Path(src.root) / src.rel).read_bytes()
    if src.root not in _stores:
        _stores[src.root] = open_store(src.root)
    return _stores[src.root].get(src.rel)


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
    ctx = mp.get_context("fork")
    chunk = max(1, min(16, len(items) // (workers * 8)))
    with ctx.Pool(workers, initializer=_init_worker, initargs=(initializer, initargs)) as pool:
        yield from pool.imap(fn, items, chunksize=chunk)


def _init_worker(initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    # Ctrl-C reaches every process of the terminal's group: the parent handles it (and
    # terminates the pool); a worker would only print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)
