"""The streaming reader: which samples each (rank, worker) reads, in which order, in which batch.

This replaces webdataset's pipeline with a few plain generators and fixes its traps for
distributed training (webdataset has no ``s3://`` opener, no length, no mid-epoch resume,
and DDP hangs when ranks get unequal batch counts): tar shards are read from any store
stream (no ``pipe:`` URL), every rank gets the same number of batches, and a run resumes
mid-epoch.

Slots. A rank runs ``workers`` loader workers; ``(rank, worker)`` is one of
``world_size * workers`` *slots*. Every slot reads contiguous runs of the selected samples
(:mod:`pneumo.shards.slots`): whole shards, streamed, and pieces of shards, each a ranged read of
the samples' byte spans (manifest schema 2). Datasets written before schema 2 have no
spans: a slot then streams such a shard and skips the members of other keys.

Training (:func:`train_stream`). Batch ``j`` of an epoch is made by worker ``j % workers``
of its rank, so a rank yields exactly ``steps_per_epoch`` batches whatever its share of the
data: ranks never disagree on the batch count and DDP never hangs. Which class each sample
of batch ``j`` is drawn from, and its augmentation seed, come from ``(seed, epoch, rank,
j)``; with a ``pos_rate`` the number of positives in a worker's batches is the running sum
of ``batch_size * rate`` rounded, so each batch is within one of the rate and every
worker's count per epoch is known in advance. Each class (or the whole selection) is one
endless sequence of passes over its samples; every draw takes the next position, and each
(epoch, slot) takes the window of positions it will draw, known in closed form. A sample
is therefore drawn once per pass, every sample of a class at the same rate, whatever the
shard sizes, ranks and workers: a 12-sample tail shard is drawn like the others. A slot
reads exactly its window, piece by piece (:mod:`pneumo.shards.slots`: pieces of a few
adjacent samples from anywhere in the pool, one ranged read each), mixed in a seeded
buffer of ``shuffle_buffer`` samples (:func:`shuffle_order`). The buffer's order is worked
out on positions alone, so resuming at step ``s`` skips the samples drawn before ``s``
without reading them and continues exactly where an uninterrupted stream would, given
the same ``world_size``, ``workers``, ``steps_per_epoch`` and ``total_steps``.

Evaluation (:func:`eval_stream`) is finite: every selected sample exactly once across all
slots, in a fixed order (shards sorted by path, tar order inside), last batch short.
Ranks may get different numbers of eval batches: reduce per-rank *sums* (e.g. Dice sum and
image count) with ``all_reduce``, and run eval on the bare model (``ddp_model.module``),
since a DDP forward may broadcast buffers and would then wait for ranks that have finished.

A shard holding a stray second copy of a key (an image given twice to one ingest batch)
yields the copy the manifest names, once.

Nothing is read in silence: every sample is checked against its manifest row as it comes
(whole, and its image hashing to ``content_sha256``; :mod:`pneumo.shards.verify`), and a
shard gone, cut short or changed stops the stream with an ``IntegrityError`` naming the
shard and the key, never a smaller or different set of samples.
"""

from __future__ import annotations

import itertools
import logging
import math
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from pneumo.shards import slots, tario
from pneumo.shards.cache import read_ahead
from pneumo.shards.errors import ConfigError, IntegrityError, ManifestError, StoreError
from pneumo.shards.slots import Entry, by_shard, place
from pneumo.shards.store import Store
from pneumo.shards.verify import VERIFY_HINT, check_sample

log = logging.getLogger(__name__)

# {"__key__", "__shard__", "__entry__", "jpg"|"png"|"npy.gz", "mask.png", "json"}
Sample = dict[str, Any]

# Samples a stream worker holds (raw bytes, not decoded) to mix the pieces it reads: 512
# with pieces of 2 (slots.PIECE) gives batches about as mixed as a uniform shuffle's
# (benchmarks/bench_shuffle.py); at 0.5 MB a sample (a 1024-px PNG), 256 MB a worker.
DEFAULT_SHUFFLE_BUFFER = 512

# The purpose of each seeded generator, so no two purposes share a stream of numbers
# (1 is pneumo.shards.slots's passes).
_BUFFER, _BATCH = 2, 3
ALL, POS, NEG = "all", "pos", "neg"


ENTRY_COLUMNS = list(Entry._fields)


def entries_from_table(table: Any) -> list[Entry]:
    """Manifest rows (a ``pyarrow.Table`` with :data:`ENTRY_COLUMNS`) as entries, sorted.

    Tables without ``offset`` and ``size`` (schema 1) give entries without a span.

    Raises:
        ManifestError: a key appears twice in one shard.
    """
    n = table.num_rows
    columns = [
        table.column(name).to_pylist() if name in table.column_names else [None] * n
        for name in ENTRY_COLUMNS
    ]
    entries = sorted((Entry(*row) for row in zip(*columns, strict=True)), key=place)
    seen: set[tuple[str, str]] = set()
    for e in entries:
        if (e.shard, e.key) in seen:
            raise ManifestError(f"key {e.key!r} is listed twice for shard {e.shard}")
        seen.add((e.shard, e.key))
    return entries


def read_shard(store: Store, path: str, wanted: Mapping[str, Entry]) -> Iterator[Sample]:
    """The samples of one tar shard whose keys are in ``wanted``, in tar order, each once.

    With byte spans (schema 2) only those bytes are read (see :func:`tario.read_samples`);
    without, the shard is streamed whole and other keys' members skipped. Every sample is
    checked as it comes (:func:`pneumo.shards.verify.check_sample`: whole, and its image the
    manifest's bytes), and every wanted sample must come: a damaged dataset stops the
    reader; it never trains or scores on fewer samples, or on other bytes.

    Raises:
        IntegrityError: the shard is gone, or a wanted sample is missing from it, cut short,
            or its image is not the manifest's (``content_sha256``); names shard and key.
        StoreError: the shard cannot be read (the store, not the data).
    """
    url = store.url_of(path)
    order = [e.key for e in sorted(wanted.values(), key=place)]
    done: set[str] = set()
    try:
        for sample in tario.read_samples(store, path, wanted):
            entry = wanted[sample["__key__"]]
            check_sample(url, entry, sample)
            done.add(entry.key)
            sample["__entry__"] = entry
            yield sample
    except IntegrityError:
        raise
    except tarfile.TarError as e:
        if len(done) == len(wanted):
            return  # past every wanted sample: the rest of the shard is verify's business
        key = _broken(store, path, wanted, [k for k in order if k not in done])
        raise IntegrityError(
            f"{url}: sample {key} is cut short or damaged ({e}): {VERIFY_HINT}"
        ) from e
    except StoreError as e:
        if len(done) == len(wanted):
            return  # every wanted sample came whole: a read past them failed, nothing is lost
        if not store.exists(path):
            raise IntegrityError(
                f"{url}: the shard does not exist, but the manifest names it "
                f"(sample {_first(order, done)}): {VERIFY_HINT}"
            ) from e
        if _past_the_end(e):
            raise IntegrityError(
                f"{url}: the shard ends before sample {_first(order, done)}: {VERIFY_HINT}"
            ) from e
        raise
    if len(done) < len(wanted):
        raise IntegrityError(
            f"{url}: sample {_first(order, done)} is not in the shard (cut short, or the "
            f"manifest and the shards disagree): {VERIFY_HINT}"
        )


def _first(order: Sequence[str], done: set[str]) -> str:
    """The first key of ``order`` not yet read (and how many more are missing)."""
    missing = [k for k in order if k not in done]
    return missing[0] + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")


def _broken(store: Store, path: str, wanted: Mapping[str, Entry], left: Sequence[str]) -> str:
    """Which of the samples ``left`` (not yet read, in tar order) a tar error was in.

    The reader hands on a sample when the next one starts, so the error may be in a later
    sample than the first one left: each is read alone, by its span, until one fails.
    """
    for key in left:
        if wanted[key].offset is None or wanted[key].size is None:
            break  # no spans: the first one left is as close as we can tell
        try:
            if not any(True for _ in tario.read_samples(store, path, {key: wanted[key]})):
                return key
        except tarfile.TarError:
            return key
    return left[0]


def _past_the_end(error: StoreError) -> bool:
    """A ranged read that starts past the object's end (S3's 416 InvalidRange): a shard
    shorter than the manifest says, not a store failure."""
    response = getattr(error.__cause__, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") == "InvalidRange"


def shuffle_order(count: int, size: int, rng: np.random.Generator) -> Iterator[int]:
    """The order in which a shuffle buffer of ``size`` hands on ``count`` items given in
    order ``0, 1, ...``: each new item replaces a random one of the buffer, which is handed
    on; the last ``size`` leave in random order. An item is handed on at most ``size``
    items after the last one read before it: memory stays at ``size`` items.

    Worked out on positions alone (no sample is read for it), so a resumed stream knows
    which of its window's samples were drawn before the resume and never reads them.
    Lazy: an endless epoch (``bench_loader``) is one huge window.
    """
    if count <= 0:
        return
    size = max(1, min(size, count))
    buffer, item = list(range(size)), size
    while item < count:  # random indices drawn in chunks: one call per _CHUNK items
        for i in rng.integers(0, size, size=min(_CHUNK, count - item)).tolist():
            yield buffer[i]
            buffer[i] = item
            item += 1
    for i in rng.permutation(size).tolist():
        yield buffer[i]


_CHUNK = 4096


def read_window(
    store: Store,
    pool: Sequence[Entry],
    seeds: Sequence[int],
    start: int,
    count: int,
    order: Iterator[int],
    *,
    drawn: Set[int] = frozenset(),
    piece: int = slots.PIECE,
) -> Iterator[Sample]:
    """The samples at positions ``start + i`` of ``pool``'s passes, for ``i`` in ``order``
    (a :func:`shuffle_order` of ``count``, less the positions ``drawn`` before a resume).

    The window's positions are read in sequence order, one ranged read per piece, except
    those ``drawn`` (not read at all); each sample is held until ``order`` reaches it.

    Raises:
        IntegrityError: a sample is missing from its shard, cut short or changed.
    """
    read = _read_positions(store, pool, seeds, start, count, drawn, piece)
    held: dict[int, Sample] = {}
    for i in order:
        while i not in held:
            j, sample = next(read)
            held[j] = sample
        yield held.pop(i)


def _read_positions(
    store: Store,
    pool: Sequence[Entry],
    seeds: Sequence[int],
    start: int,
    count: int,
    drawn: Set[int],
    piece: int,
) -> Iterator[tuple[int, Sample]]:
    """``(i, sample)`` for the positions ``start + i`` (``i < count``, not in ``drawn``) of
    ``pool``'s passes, in sequence order."""
    i = 0
    runs = slots.positions(pool, seeds, start, start + count, piece=piece)
    for run in read_ahead(store, runs):  # a remote store opens the next reads meanwhile
        index = {e.key: i + j for j, e in enumerate(run) if i + j not in drawn}
        i += len(run)
        if not index:
            continue  # drawn before the resume: not read
        for sample in read_shard(store, run[0].shard, {e.key: e for e in run if e.key in index}):
            yield index[sample["__key__"]], sample


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """Everything that decides a rank's training batches of one epoch.

    ``workers`` counts *stream* workers, at least 1: a loader running in-process (0 loader
    workers) is one stream worker. ``pos_rate=(a, b)`` makes the share of positives slide
    linearly from ``a`` to ``b`` over ``total_steps`` (:func:`batch_draws`); ``None`` keeps
    the natural mix. ``shuffle_buffer`` and ``piece`` (samples per ranged read, see
    :mod:`pneumo.shards.slots`) set how well batches are mixed.
    """

    seed: int = 0
    epoch: int
    rank: int = 0
    world_size: int = 1
    workers: int = 1
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    start_step: int = 0
    pos_rate: tuple[float, float] | None = None
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    piece: int = slots.PIECE
    # The layout the run was planned with, when it now runs on another (an elastic resume,
    # pneumo.shards.elastic): None, this one.
    plan_world_size: int | None = None
    plan_workers: int | None = None

    @property
    def planned(self) -> bool:
        """Whether this layout is the run's plan (the plain stream makes its batches)."""
        return (self.plan_world_size or self.world_size) == self.world_size and (
            self.plan_workers or self.workers
        ) == self.workers

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not within world size {self.world_size}")
        positive = (
            "workers", "batch_size", "steps_per_epoch", "total_steps", "shuffle_buffer", "piece"
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0 or self.epoch < 0:
            raise ConfigError("seed and epoch must not be negative")
        if not 0 <= self.start_step <= self.steps_per_epoch:
            raise ConfigError(
                f"start step {self.start_step} is outside the epoch (0..{self.steps_per_epoch})"
            )
        check_pos_rate(self.pos_rate)
        if (self.plan_world_size or 1) < 1 or (self.plan_workers or 1) < 1:
            raise ConfigError("the planned world size and workers must be at least 1")
        samples = (self.plan_world_size or self.world_size) * self.batch_size
        if samples % self.world_size:
            raise ConfigError(
                f"a step of this run trains {self.plan_world_size} processes x "
                f"{self.batch_size} images: {samples} images cannot be shared evenly by "
                f"{self.world_size} processes (choose a divisor of {samples})"
            )


def check_pos_rate(pos_rate: tuple[float, float] | None) -> None:
    if pos_rate is not None and (len(pos_rate) != 2 or not all(0 <= p <= 1 for p in pos_rate)):
        raise ConfigError(f"pos_rate {pos_rate} must be two probabilities, like (0.8, 0.4)")


def class_pools(
    entries: Sequence[Entry], pos_rate: tuple[float, float] | None
) -> dict[str, list[Entry]]:
    """The sub-streams to mix: ``{"all": ...}``, or ``{"pos": ..., "neg": ...}`` for a pos_rate.

    Unlabelled entries (``has_ptx`` null) are in neither class. An empty class falls back to
    the other one (logged).

    Raises:
        ConfigError: nothing to train on.
    """
    if pos_rate is None:
        pools = {ALL: list(entries)}
    else:
        pools = {
            POS: [e for e in entries if e.has_ptx is True],
            NEG: [e for e in entries if e.has_ptx is False],
        }
        empty = [name for name, pool in pools.items() if not pool]
        if len(empty) == 1:
            log.warning(
                "the selection has no %s samples: pos_rate %s is ignored, every sample is %s",
                "positive" if empty[0] == POS else "negative", pos_rate,
                "negative" if empty[0] == POS else "positive",
            )  # fmt: skip
            pools = {ALL: pools[NEG if empty[0] == POS else POS]}
    if not any(pools.values()):
        raise ConfigError("the selection has no labelled samples to train on (check --where)")
    return pools


def positive_rate(spec: TrainSpec, step: int) -> float:
    """The probability of drawing a positive at ``step`` of ``spec.epoch``."""
    if spec.pos_rate is None:
        raise ConfigError("positive_rate needs a pos_rate")
    a, b = spec.pos_rate
    progress = (spec.epoch * spec.steps_per_epoch + step) / spec.total_steps
    return a + (b - a) * min(max(progress, 0.0), 1.0)


def batch_draws(
    spec: TrainSpec, step: int, pools: Mapping[str, Any]
) -> tuple[list[str], list[int]]:
    """Which pool each sample of batch ``step`` comes from, and its augmentation seed.

    One pool ``all``: every draw from it. With a ``pos_rate``, the positives of a stream
    worker's batches follow the running sum of ``batch_size * positive_rate``, rounded: each
    batch is within one of the rate, and the worker's total per epoch is :func:`draws`,
    known before the epoch starts. Other pools (the N classes of a classifier, named by the
    caller): the worker's draws go round the classes in turn, so every class is drawn
    equally often (within one per worker and epoch) whatever its size.
    """
    rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, step, _BATCH])
    seeds = [int(s) for s in rng.integers(0, 2**32, size=spec.batch_size, dtype=np.uint64)]
    if ALL in pools:
        return [ALL] * spec.batch_size, seeds
    worker = step % spec.workers
    if spec.pos_rate is None:  # N classes, uniformly
        classes = sorted(pools)
        first = (step // spec.workers) * spec.batch_size + spec.epoch  # draws before, rotated
        names = [classes[(first + i) % len(classes)] for i in range(spec.batch_size)]
        return [names[i] for i in rng.permutation(spec.batch_size)], seeds
    n_pos = _positives(spec, spec.epoch, worker, step + 1) - _positives(
        spec, spec.epoch, worker, step
    )
    names = [NEG] * spec.batch_size
    for i in rng.permutation(spec.batch_size)[:n_pos]:
        names[i] = POS
    return names, seeds


def _positives(spec: TrainSpec, epoch: int, worker: int, stop: int) -> int:
    """Positives in stream worker ``worker``'s batches before step ``stop`` of ``epoch``:
    the running sum of ``batch_size * rate``, rounded.

    In exact arithmetic: with floats, a sum over more steps could round below one over
    fewer (0.4999... against 0.5), a batch would get a negative count and the worker more
    positives than :func:`draws` planned, and its stream would run dry mid-epoch."""
    steps = range(worker, min(stop, spec.steps_per_epoch), spec.workers)
    return math.floor(spec.batch_size * _rate_sum(spec, epoch, steps) + Fraction(1, 2))


def _rate_sum(spec: TrainSpec, epoch: int, steps: range) -> Fraction:
    """``sum(positive_rate at step j of epoch for j in steps)``, in closed form and exact
    (the rates' binary values as fractions): the rate is linear in the step until the
    slide ends, then flat."""
    a, b = (Fraction(p) for p in spec.pos_rate)  # type: ignore[union-attr]
    done = epoch * spec.steps_per_epoch  # steps of the earlier epochs
    sliding = min(len(steps), len(range(steps.start, spec.total_steps - done + 1, steps.step)))
    step_sum = sliding * steps.start + steps.step * sliding * (sliding - 1) // 2
    linear = sliding * a + (b - a) * (sliding * done + step_sum) / spec.total_steps
    return linear + (len(steps) - sliding) * b


def draws(spec: TrainSpec, pool: str, epoch: int, worker: int, classes: Sequence[str] = ()) -> int:
    """How many samples stream worker ``worker`` (of any rank) draws from ``pool`` in ``epoch``.

    ``classes``: the sorted pool names when the stream draws N classes uniformly.
    """
    n = spec.batch_size * len(range(worker, spec.steps_per_epoch, spec.workers))
    if pool == ALL:
        return n
    if spec.pos_rate is None:  # draw d of the worker's epoch is class (d + epoch) % K
        k, j = len(classes), list(classes).index(pool)
        return n // k + (1 if (j - epoch) % k < n % k else 0)
    positives = _positives(spec, epoch, worker, spec.steps_per_epoch)
    return positives if pool == POS else n - positives


def slot_window(
    spec: TrainSpec, pool: str, slot: int, classes: Sequence[str] = ()
) -> tuple[int, int]:
    """``(start, count)``: the positions of ``pool``'s passes that ``slot`` draws in
    ``spec.epoch``. Epochs take consecutive windows, and within one the slots in order."""
    start = 0
    for epoch in range(spec.epoch + 1):
        per_worker = [draws(spec, pool, epoch, w, classes) for w in range(spec.workers)]
        if epoch < spec.epoch:
            start += spec.world_size * sum(per_worker)
    rank, worker = divmod(slot, spec.workers)
    start += rank * sum(per_worker) + sum(per_worker[:worker])
    return start, per_worker[worker]


def train_stream(
    store: Store, pools: Mapping[str, Sequence[Entry]], spec: TrainSpec, worker: int
) -> Iterator[tuple[int, list[Sample]]]:
    """``(step, samples)`` for the steps ``j`` of the epoch with ``j % spec.workers == worker``.

    Steps before ``spec.start_step`` are consumed but not yielded (resume). Each sample
    carries its augmentation seed as ``sample["__seed__"]``.
    """
    if not 0 <= worker < spec.workers:
        raise ConfigError(f"worker {worker} is not within {spec.workers} workers")
    slot = spec.rank * spec.workers + worker
    done: Counter[str] = Counter()  # draws of each class before the resume
    for step in range(worker, spec.start_step, spec.workers):
        done.update(batch_draws(spec, step, pools)[0])
    streams: dict[str, Iterator[Sample]] = {}
    classes = sorted(pools)
    for tag, name in enumerate(classes, start=1):
        start, count = slot_window(spec, name, slot, classes)
        rng = np.random.default_rng([spec.seed, spec.epoch, slot, tag, _BUFFER])
        order = shuffle_order(count, spec.shuffle_buffer, rng)
        drawn = set(itertools.islice(order, done[name]))
        streams[name] = read_window(
            store, pools[name], (spec.seed, tag), start, count, order, drawn=drawn,
            piece=spec.piece,
        )  # fmt: skip
    for step in range(worker, spec.steps_per_epoch, spec.workers):
        if step < spec.start_step:
            continue  # drawn before the resume: its samples are left out of ``order``
        names, seeds = batch_draws(spec, step, pools)
        samples = [next(streams[name]) for name in names]
        for sample, seed in zip(samples, seeds, strict=True):
            sample["__seed__"] = seed
        yield step, samples


def logical_worker(loader_worker: int, workers: int, start_step: int) -> int:
    """The stream worker a DataLoader worker plays so batches come out in step order.

    A DataLoader takes batches from its workers round-robin, starting with worker 0; the
    first batch wanted is ``start_step``, made by stream worker ``start_step % workers``.
    """
    return (loader_worker + start_step) % workers


def rank_stream(
    store: Store, pools: Mapping[str, Sequence[Entry]], spec: TrainSpec
) -> Iterator[tuple[int, list[Sample]]]:
    """A rank's batches in step order, all stream workers in this process.

    What a DataLoader with ``spec.workers`` workers delivers, without one (tests, tools).
    """
    streams = [
        train_stream(store, pools, spec, logical_worker(w, spec.workers, spec.start_step))
        for w in range(spec.workers)
    ]
    for index in range(spec.steps_per_epoch - spec.start_step):
        yield next(streams[index % spec.workers])


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """Which slot of an evaluation this is, and its batch size."""

    rank: int = 0
    world_size: int = 1
    workers: int = 1
    batch_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not within world size {self.world_size}")
        if self.workers < 1 or self.batch_size < 1:
            raise ConfigError("workers and batch_size must be at least 1")


def eval_stream(
    store: Store, entries: Sequence[Entry], spec: EvalSpec, worker: int
) -> Iterator[list[Sample]]:
    """The batches of one eval slot: its share of ``entries``, each once, in a fixed order."""
    if not 0 <= worker < spec.workers:
        raise ConfigError(f"worker {worker} is not within {spec.workers} workers")
    slot = spec.rank * spec.workers + worker
    share = slots.assign_slots(entries, spec.world_size * spec.workers)[slot]
    batch: list[Sample] = []
    for run in read_ahead(store, by_shard(share).values()):
        for sample in read_shard(store, run[0].shard, {e.key: e for e in run}):
            batch.append(sample)
            if len(batch) == spec.batch_size:
                yield batch
                batch = []
    if batch:
        yield batch
