"""Training batches of a run that resumes on another number of processes or loader workers.

A run's *plan* is the layout it started with: ``plan_world_size`` ranks of
``plan_workers`` stream workers (:class:`pneumo.shards.stream.TrainSpec`). The plan decides,
for good, which samples make global step ``j`` of every epoch: the batches its ranks
would make (:func:`pneumo.shards.stream.train_stream`), rank 0's, then rank 1's, ...,
``plan_world_size x batch_size`` samples with their augmentation seeds. A run resumed on
another layout (fewer GPUs after a node failed, more when capacity came back, other
loader workers) trains exactly those samples: rank ``r`` of ``W`` ranks takes the ``r``-th
of ``W`` equal parts of each global step. So every step sees the samples and seeds the
uninterrupted run would have, every pass gives every sample once (no duplicates, no
gaps), and the learning-rate schedule, counted in steps of the same number of samples,
goes on as planned. Only the way a step's images are split into per-rank batches changes
(what BatchNorm sees in one forward pass, and the gradient's summation order).

A stream worker of the new layout reads only the samples of its steps and its part: it
replays the planned slots' shuffle orders on positions (no bytes read) and reads the
positions it needs, piece by piece, skipping the rest (``stream.read_window``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np

from pneumo.shards import stream
from pneumo.shards.errors import ConfigError
from pneumo.shards.slots import Entry
from pneumo.shards.store import Store
from pneumo.shards.stream import Sample, TrainSpec


def train_stream(
    store: Store, pools: Mapping[str, Sequence[Entry]], spec: TrainSpec, worker: int
) -> Iterator[tuple[int, list[Sample]]]:
    """``(step, samples)`` for the steps ``j`` of the epoch with ``j % spec.workers ==
    worker``, from ``spec.start_step`` on: this rank's part of each planned global step.

    The plain stream when the layout is the plan's; else the part described in the
    module doc (``len(samples) == plan_world_size * batch_size // world_size``).
    """
    if spec.planned:
        yield from stream.train_stream(store, pools, spec, worker)
        return
    if not 0 <= worker < spec.workers:
        raise ConfigError(f"worker {worker} is not within {spec.workers} workers")
    part = _Part(spec, pools, worker)
    plan = part.planned(0)  # a window is the slot's: the rank is not read
    streams = {
        key: _read_draws(store, pools, plan, key, draws) for key, draws in part.wanted().items()
    }
    for j in part.steps:
        samples = []
        for slot, name, seed in part.samples(j):
            sample = next(streams[slot, name])
            sample["__seed__"] = seed
            samples.append(sample)
        yield j, samples


class _Part:
    """One stream worker's part of a run planned on another layout: its steps, and for
    each, which planned (slot, class) streams its samples come from."""

    def __init__(self, spec: TrainSpec, pools: Mapping[str, Sequence[Entry]], worker: int):
        self.spec, self.pools, self.classes = spec, pools, sorted(pools)
        self.plan_world = spec.plan_world_size or spec.world_size
        self.plan_workers = spec.plan_workers or spec.workers
        self.size = self.plan_world * spec.batch_size // spec.world_size
        self.first = spec.rank * self.size  # of a global step's samples, in plan rank order
        self.steps = [
            j for j in range(worker, spec.steps_per_epoch, spec.workers) if j >= spec.start_step
        ]

    def planned(self, rank: int) -> TrainSpec:
        """The spec of planned rank ``rank``, as far as the plan's draws and windows read it
        (``batch_draws`` and ``slot_window`` read neither the start step nor the plan)."""
        return replace(self.spec, rank=rank, world_size=self.plan_world, workers=self.plan_workers)

    def _mine(self, g: int) -> bool:
        return self.first <= g < self.first + self.size

    def wanted(self) -> dict[tuple[int, str], list[int]]:
        """``(planned slot, class) -> the indices of its draws this part takes``, in order."""
        wanted: dict[tuple[int, str], list[int]] = defaultdict(list)
        steps, b = set(self.steps), self.spec.batch_size
        for rank in range(self.first // b, (self.first + self.size - 1) // b + 1):
            for w in range(self.plan_workers):
                slot, drawn = rank * self.plan_workers + w, dict.fromkeys(self.classes, 0)
                for j in range(w, self.spec.steps_per_epoch, self.plan_workers):
                    names, _ = stream.batch_draws(self.planned(rank), j, self.pools)
                    for i, name in enumerate(names):
                        if j in steps and self._mine(rank * b + i):
                            wanted[slot, name].append(drawn[name])
                        drawn[name] += 1
        return wanted

    def samples(self, j: int) -> list[tuple[int, str, int]]:
        """``(planned slot, class, augmentation seed)`` of each sample of this part of step
        ``j``, in order."""
        out = []
        for g in range(self.first, self.first + self.size):
            rank, i = divmod(g, self.spec.batch_size)
            names, seeds = stream.batch_draws(self.planned(rank), j, self.pools)
            out.append((rank * self.plan_workers + j % self.plan_workers, names[i], seeds[i]))
        return out


def _read_draws(
    store: Store,
    pools: Mapping[str, Sequence[Entry]],
    plan: TrainSpec,
    key: tuple[int, str],
    draws: list[int],
) -> Iterator[Sample]:
    """The samples of draws ``draws`` of planned slot ``key[0]``'s class ``key[1]`` stream,
    in order; no other sample of its window is read."""
    slot, name = key
    classes = sorted(pools)
    tag = classes.index(name) + 1
    start, count = stream.slot_window(plan, name, slot, classes)
    rng = np.random.default_rng([plan.seed, plan.epoch, slot, tag, stream._BUFFER])
    order = list(stream.shuffle_order(count, plan.shuffle_buffer, rng))
    needed = [order[d] for d in draws]
    return stream.read_window(
        store, pools[name], (plan.seed, tag), start, count, iter(needed),
        drawn=set(order).difference(needed), piece=plan.piece,
    )  # fmt: skip


def rank_stream(
    store: Store, pools: Mapping[str, Sequence[Entry]], spec: TrainSpec
) -> Iterator[tuple[int, list[Sample]]]:
    """A rank's batches in step order, all stream workers in this process (tests, tools)."""
    streams = [
        train_stream(store, pools, spec, stream.logical_worker(w, spec.workers, spec.start_step))
        for w in range(spec.workers)
    ]
    for index in range(spec.steps_per_epoch - spec.start_step):
        yield next(streams[index % spec.workers])
