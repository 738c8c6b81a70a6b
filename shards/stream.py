"""The streaming reader: which samples each (rank, worker) reads, in which order, in which batch.

This replaces webdataset's pipeline with a few plain generators and fixes its traps for
distributed training (see DOMAIN.md): tar shards are read from any store stream (no
``pipe:`` URL), every rank gets the same number of batches, and a run resumes mid-epoch.

Slots. A rank runs ``workers`` loader workers; ``(rank, worker)`` is one of
``world_size * workers`` *slots* and every slot reads its own share of the selected samples:

* shard mode, when there are at least as many shards as slots: whole shards are dealt to
  slots (each shard to the slot with the fewest samples so far), so every shard is read once;
* sample mode, otherwise: samples are dealt by index modulo the slot count, and a slot reads
  every shard but keeps only its keys. Other members are skipped at the tar member level.

Training (:func:`train_stream`) is infinite per slot: each slot cycles through its shards
forever, the shard order shuffled from ``(seed, epoch, slot, cycle)``, the samples shuffled
in a small seeded buffer. Batch ``j`` of an epoch is made by worker ``j % workers`` of its
rank, so a rank yields exactly ``steps_per_epoch`` batches whatever its share of the data:
ranks never disagree on the batch count and DDP never hangs. Which class each sample of
batch ``j`` is drawn from, and its augmentation seed, come from a generator seeded with
``(seed, epoch, rank, j)``; only the per-slot sub-streams carry state. Resuming at step ``s``
replays the sub-streams for the batches before ``s`` on raw bytes (nothing is decoded), so
the resumed stream continues exactly where an uninterrupted one would, given the same
``world_size`` and ``workers``.

Evaluation (:func:`eval_stream`) is finite: every selected sample exactly once across all
slots, in a fixed order (shards sorted by path, tar order inside), last batch short.
Ranks may get different numbers of eval batches: reduce per-rank *sums* (e.g. Dice sum and
image count) with ``all_reduce``, and run eval on the bare model (``ddp_model.module``), since
a DDP forward may broadcast buffers and would then wait for ranks that have finished.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from shards.errors import ConfigError, ManifestError, StoreError
from shards.store import Store

log = logging.getLogger(__name__)

Sample = dict[str, Any]  # {"__key__", "__shard__", "__entry__", "jpg"|"png", "mask.png", "json"}

DEFAULT_SHUFFLE_BUFFER = 64
# tarfile reads its stream in blocks of this size; it also copies what is left of a block on
# every read, so a larger block costs more than it saves.
TAR_BLOCK = 64 * 1024

# The purpose of each seeded generator, so no two purposes share a stream of numbers.
_ASSIGN, _ORDER, _BUFFER, _BATCH = 1, 2, 3, 4
ALL, POS, NEG = "all", "pos", "neg"


class Entry(NamedTuple):
    """One selected sample, as the manifest describes it."""

    key: str
    shard: str
    image_id: str
    has_ptx: bool | None


ENTRY_COLUMNS = list(Entry._fields)


def entries_from_table(table: Any) -> list[Entry]:
    """Manifest rows (a ``pyarrow.Table`` with :data:`ENTRY_COLUMNS`) as entries, sorted.

    Raises:
        ManifestError: a key appears twice in one shard.
    """
    columns = [table.column(name).to_pylist() for name in ENTRY_COLUMNS]
    entries = sorted((Entry(*row) for row in zip(*columns, strict=True)), key=_place)
    for a, b in itertools.pairwise(entries):
        if (a.shard, a.key) == (b.shard, b.key):
            raise ManifestError(f"key {a.key!r} is listed twice for shard {a.shard}")
    return entries


def _place(e: Entry) -> tuple[str, str]:
    return e.shard, e.key


def _by_shard(entries: Sequence[Entry]) -> dict[str, dict[str, Entry]]:
    out: dict[str, dict[str, Entry]] = {}
    for e in entries:
        out.setdefault(e.shard, {})[e.key] = e
    return out


def assign_slots(
    entries: Sequence[Entry], n_slots: int, *, seed: int = 0, epoch: int = 0, shuffle: bool
) -> list[list[Entry]]:
    """Split ``entries`` among ``n_slots`` slots: whole shards if there are enough, else samples.

    With ``shuffle`` the split changes with ``(seed, epoch)``; without it, it is fixed (eval).
    A slot gets nothing only in sample mode with fewer samples than slots.
    """
    by_shard = _by_shard(entries)
    shards = sorted(by_shard)
    rng = np.random.default_rng([seed, epoch, _ASSIGN]) if shuffle else None
    if len(shards) >= n_slots:
        if rng is not None:
            shards = [shards[i] for i in rng.permutation(len(shards))]
        slots: list[list[Entry]] = [[] for _ in range(n_slots)]
        lightest = [(0, slot) for slot in range(n_slots)]  # (samples so far, slot)
        for shard in shards:
            count, slot = heapq.heappop(lightest)
            slots[slot].extend(by_shard[shard].values())
            heapq.heappush(lightest, (count + len(by_shard[shard]), slot))
        return [sorted(s, key=_place) for s in slots]
    ordered = [e for shard in shards for e in by_shard[shard].values()]
    if rng is not None:
        ordered = [ordered[i] for i in rng.permutation(len(ordered))]
    return [sorted(ordered[s::n_slots], key=_place) for s in range(n_slots)]


def read_shard(store: Store, path: str, wanted: Mapping[str, Entry]) -> Iterator[Sample]:
    """The samples of one tar shard whose keys are in ``wanted``, in tar order.

    Members of other keys are skipped by their tar header: their bytes are never copied
    out, let alone decoded. A key is the member name up to the first dot of its base name,
    as webdataset splits it; suffixes are lower-cased.

    Raises:
        StoreError: the shard cannot be read or is not a tar file.
    """
    found = 0
    with closing(store.open_read(path)) as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_BLOCK)  # noqa: SIM115
            current: Sample | None = None
            for info in tar:
                tar.members = []  # stream mode would keep every header otherwise
                key, suffix = _split_name(info.name)
                if not info.isreg() or key not in wanted:
                    continue
                member = tar.extractfile(info)
                data = member.read() if member is not None else b""
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    found += 1
                    current = {"__key__": key, "__shard__": path, "__entry__": wanted[key]}
                current[suffix] = data
            if current is not None:
                yield current
        except tarfile.TarError as e:
            raise StoreError(f"{store.url_of(path)} is not a readable tar shard: {e}") from e
    if found < len(wanted):
        log.warning(
            "%s: %d of the %d selected samples are missing from the shard (the manifest "
            "and the shards disagree; re-run the ingest of this batch)",
            store.url_of(path), len(wanted) - found, len(wanted),
        )  # fmt: skip


def _split_name(name: str) -> tuple[str, str]:
    head, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{head}/{key}" if head else key), suffix.lower()


def shuffled(samples: Iterator[Sample], size: int, rng: np.random.Generator) -> Iterator[Sample]:
    """A shuffle buffer of ``size`` samples: each new sample replaces a random one, yielded."""
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = sample
    while buffer:  # only reached when ``samples`` ends
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()


def cycled(store: Store, entries: Sequence[Entry], seeds: Sequence[int]) -> Iterator[Sample]:
    """The samples of ``entries``, forever; each cycle reads the shards in a new order.

    Raises:
        ManifestError: a whole cycle found none of the entries in their shards.
    """
    by_shard = _by_shard(entries)
    shards = sorted(by_shard)
    if not shards:
        raise ConfigError("nothing to stream: no samples were given")
    for cycle in itertools.count():
        rng = np.random.default_rng([*seeds, _ORDER, cycle])
        found = 0
        for i in rng.permutation(len(shards)):
            for sample in read_shard(store, shards[i], by_shard[shards[i]]):
                found += 1
                yield sample
        if not found:
            raise ManifestError(
                f"none of the {len(entries)} selected samples is in its shard "
                f"({shards[0]}, ...): the manifest and the shards disagree"
            )


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """Everything that decides a rank's training batches of one epoch.

    ``workers`` counts *stream* workers, at least 1: a loader running in-process (0 loader
    workers) is one stream worker. ``pos_rate=(a, b)`` draws a positive with probability
    sliding linearly from ``a`` to ``b`` over ``total_steps``; ``None`` keeps the natural mix.
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

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not within world size {self.world_size}")
        positive = ("workers", "batch_size", "steps_per_epoch", "total_steps", "shuffle_buffer")
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

    One pool ``all``: every draw from it. ``pos``/``neg`` with a ``pos_rate``: a positive
    with :func:`positive_rate`. Other pools (the N classes of a classifier, named by the
    caller): each draw picks a pool uniformly, so every class is drawn equally often
    whatever its size (the two-class case is a positive rate of one half).
    """
    rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, step, _BATCH])
    uniform = rng.random(spec.batch_size)
    seeds = [int(s) for s in rng.integers(0, 2**32, size=spec.batch_size, dtype=np.uint64)]
    if ALL in pools:
        return [ALL] * spec.batch_size, seeds
    if spec.pos_rate is not None:
        p = positive_rate(spec, step)
        return [POS if u < p else NEG for u in uniform], seeds
    names = sorted(pools)
    return [names[min(int(u * len(names)), len(names) - 1)] for u in uniform], seeds


def _slot_share(pool: Sequence[Entry], spec: TrainSpec, slot: int) -> list[Entry]:
    n_slots = spec.world_size * spec.workers
    share = assign_slots(pool, n_slots, seed=spec.seed, epoch=spec.epoch, shuffle=True)[slot]
    if not share:  # fewer samples than slots: some samples are read by several slots
        log.debug("%d samples for %d slots: slot %d re-reads one", len(pool), n_slots, slot)
        share = [pool[slot % len(pool)]]
    return share


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
    streams: dict[str, Iterator[Sample]] = {}
    for tag, name in enumerate(sorted(pools), start=1):
        share = _slot_share(pools[name], spec, slot)
        seeds = (spec.seed, spec.epoch, slot, tag)
        buffer = min(spec.shuffle_buffer, len(share))
        rng = np.random.default_rng([*seeds, _BUFFER])
        streams[name] = shuffled(cycled(store, share, seeds), buffer, rng)
    for step in range(worker, spec.steps_per_epoch, spec.workers):
        names, seeds = batch_draws(spec, step, pools)
        samples = [next(streams[name]) for name in names]
        if step < spec.start_step:
            continue  # resume: these bytes were read only to advance the sub-streams
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
    share = assign_slots(entries, spec.world_size * spec.workers, shuffle=False)[slot]
    batch: list[Sample] = []
    for shard, wanted in sorted(_by_shard(share).items()):
        for sample in read_shard(store, shard, wanted):
            batch.append(sample)
            if len(batch) == spec.batch_size:
                yield batch
                batch = []
    if batch:
        yield batch
