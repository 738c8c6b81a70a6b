"""Which samples each reader slot reads: contiguous runs of shards laid end to end.

A slot is one (rank, loader worker) of a job. Both plans below hand a slot runs of
adjacent selected samples in tar order, each one ranged read: together the slots read
each selected byte about once (per pass), however few the shards.

* Evaluation (:func:`assign_slots`): the shards, sorted by path, laid end to end and cut
  into one run per slot, sizes differing by at most one. Every sample is read once.
* Training (:func:`positions`): a pool (all samples, or one class) is an endless sequence
  of *passes*; each pass lays the pool's *pieces* end to end in an order drawn from the
  seed and the pass number. A piece is :data:`PIECE` adjacent samples of one shard (one
  short ranged read); a shard whose rows have no byte spans (manifest schema 1) is one
  piece, streamed whole. Position ``i`` of the sequence is sample ``i % n`` of pass
  ``i // n``. Every draw from the pool, by any slot in any epoch, takes the next position:
  ``pneumo.shards.stream`` gives each (epoch, slot) the window of positions it will draw, so a
  sample is drawn once per pass, every sample at the same rate, whatever the shard sizes
  and whatever the number of slots.

Why pieces and not whole shards: shards hold samples in ingest order, and an archive is
ingested patient by patient (NIH's tars are), so a whole shard read in order, even through
a shuffle buffer, gives batches of one or two patients; correlated batches bias BatchNorm
statistics and gradients. Pieces of two samples from anywhere in the pool, mixed in the
stream's buffer, bring a batch's share of same-patient pairs to within about 1.3x that of a
uniform shuffle (``benchmarks/bench_shuffle.py``), while each read stays a contiguous byte
range.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from pneumo.shards.errors import ConfigError

_PASS = 1  # this module's purpose tag in seeded generators (see pneumo.shards.stream)

PIECE = 2  # samples per piece: the unit a pass is shuffled in (see the module doc)


class Entry(NamedTuple):
    """One selected sample, as the manifest describes it."""

    key: str
    shard: str
    image_id: str
    has_ptx: bool | None
    offset: int | None = None  # the sample's byte span in its shard; None before schema 2
    size: int | None = None
    content_sha256: str | None = None  # of the image member; the stream checks it as it reads


def place(e: Entry) -> tuple[str, int, str]:
    """Tar order: by byte offset where the manifest has it, else by key."""
    return e.shard, -1 if e.offset is None else e.offset, e.key


def by_shard(entries: Iterable[Entry]) -> dict[str, list[Entry]]:
    """``{shard: entries}``, shards sorted by path, each shard's entries in tar order."""
    out: dict[str, list[Entry]] = {}
    for e in sorted(entries, key=place):
        out.setdefault(e.shard, []).append(e)
    return out


def assign_slots(entries: Sequence[Entry], n_slots: int) -> list[list[Entry]]:
    """``entries`` cut into ``n_slots`` contiguous runs of the shards laid end to end.

    Sizes differ by at most one; a run holds whole shards and at most two pieces of shards.

    Raises:
        ConfigError: no slots.
    """
    if n_slots < 1:
        raise ConfigError(f"need at least one slot, got {n_slots}")
    line = [e for run in by_shard(entries).values() for e in run]
    size, extra = divmod(len(line), n_slots)
    runs, start = [], 0
    for slot in range(n_slots):
        stop = start + size + (slot < extra)
        runs.append(line[start:stop])
        start = stop
    return runs


def pieces(pool: Iterable[Entry], piece: int = PIECE) -> list[list[Entry]]:
    """``pool`` cut into pieces: runs of up to ``piece`` adjacent samples of one shard, in
    shard and tar order; a shard with a sample lacking its byte span is one piece.

    Raises:
        ConfigError: ``piece`` below 1.
    """
    if piece < 1:
        raise ConfigError(f"a piece holds at least one sample, got {piece}")
    out: list[list[Entry]] = []
    for run in by_shard(pool).values():
        if any(e.offset is None or e.size is None for e in run):
            out.append(run)  # read by streaming the shard: once per pass, not per piece
        else:
            out.extend(run[i : i + piece] for i in range(0, len(run), piece))
    return out


def positions(
    pool: Sequence[Entry],
    seeds: Sequence[int],
    start: int,
    stop: int | None = None,
    *,
    piece: int = PIECE,
) -> Iterator[list[Entry]]:
    """Positions ``[start, stop)`` (``None``: endless) of ``pool``'s sequence of passes, as
    runs of adjacent samples of one shard each (a piece, or the part of one the window
    holds), in sequence order.

    Pass ``k`` lays the pieces (:func:`pieces`) end to end in an order drawn from
    ``(*seeds, k)``.

    Raises:
        ConfigError: an empty pool.
    """
    cut = pieces(pool, piece)
    n = sum(len(run) for run in cut)
    if not n:
        raise ConfigError("nothing to stream: no samples were given")
    first, skip = divmod(start, n)
    left = None if stop is None else stop - start
    for k in itertools.count(first):
        for i in np.random.default_rng([*seeds, _PASS, k]).permutation(len(cut)):
            run = cut[i]
            if skip >= len(run):
                skip -= len(run)
                continue
            run, skip = run[skip:], 0
            if left is not None:
                run, left = run[:left], left - len(run[:left])
            if run:
                yield run
            if left == 0:
                return
