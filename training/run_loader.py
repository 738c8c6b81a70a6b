"""A training run's loader: one set of loader workers serving every pass of the run.

Kept apart from :mod:`pneumo.training.data`, which streams one pass (an epoch's training
batches, or an evaluation's) from a loader made for it: :class:`RunLoader` makes the very
same batches from one persistent DataLoader, whose workers are told each new pass through
shared memory. The training loop (:mod:`pneumo.training.loop`) holds one per rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import IterableDataset

from pneumo.shards import stream
from pneumo.shards.errors import ConfigError
from pneumo.training.data import EvalBatches, LoaderConfig, TrainBatches, train_spec
from pneumo.training.loader_workers import dataloader


class RunLoader:
    """A training run's batches from one DataLoader whose workers stay for the whole run.

    The training batches of any epoch from any step (:meth:`train`: each epoch, and the
    epoch's first batches again for PreciseBN) and the validation batches (:meth:`val`:
    after each epoch, and segmentation's post-processing search) all come from one set of
    ``workers`` loader processes, started on the first call and stopped by :meth:`close`:
    no fork, store client and process start-up per epoch and per validation, and one set of
    workers (never a training set and a validation set) holding memory.

    A persistent DataLoader pickles (or forks) its dataset once, at the workers' start, so
    the workers cannot be handed a new epoch through the dataset object. Each call writes
    what it wants (training or validation, epoch, start step) into a small tensor in shared
    memory and then starts a new pass of the loader: each worker reads the tensor when it
    begins its share of the new pass (torch's ``_ResumeIteration``, which follows every
    batch wanted before it in the worker's queue) and plays the same stream worker as
    ``data.train_batches`` / ``data.eval_batches`` would, so the batches are exactly theirs;
    the new pass starts taking batches from worker 0 again, as a new loader would. Batches
    the workers had made ahead for the pass before are dropped (at most
    ``PREFETCH_BATCHES`` a worker, when a pass stops early, as PreciseBN's does).
    ``workers=0`` reads in this process, with the same batches.

    ``train`` and ``val`` must agree on dataset and workers (one set of workers).
    """

    def __init__(
        self,
        train: LoaderConfig,
        val: LoaderConfig,
        *,
        rank: int,
        world_size: int,
        steps_per_epoch: int,
        total_steps: int,
        pools: dict[str, list[stream.Entry]],
        val_entries: list[stream.Entry],
        planned: tuple[int, int] | None = None,
    ) -> None:
        if (train.dataset, train.workers) != (val.dataset, val.workers):
            raise ConfigError(
                "a run's training and validation loaders need one dataset and workers"
            )
        self.spe = steps_per_epoch
        self._plan = torch.zeros(3, dtype=torch.int64).share_memory_()  # kind, epoch, start
        plan_world, plan_workers = planned or (None, None)  # an elastic resume's plan
        spec = train_spec(
            train, rank=rank, world_size=world_size, epoch=0, steps_per_epoch=steps_per_epoch,
            total_steps=total_steps, plan_world_size=plan_world, plan_workers=plan_workers,
        )  # fmt: skip
        eval_spec = stream.EvalSpec(
            rank=rank, world_size=world_size, workers=val.stream_workers, batch_size=val.batch_size
        )
        self._dataset = _RunBatches(train, val, pools, val_entries, spec, eval_spec, self._plan)
        self._loader = dataloader(self._dataset, train.workers, persistent=True)
        self._pass = 0

    def train(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's training batches of ``epoch`` from ``start_step`` on (what
        ``data.train_batches`` gives for them); the pass starts now."""
        self._dataset.train_spec(epoch, start_step)  # bad values: ConfigError here, not in a worker
        return self._start((_TRAIN, epoch, start_step))

    def val(self) -> Iterator[dict[str, Any]]:
        """This rank's share of the validation entries (what ``data.eval_batches`` gives)."""
        return self._start((_VAL, 0, 0))

    def _start(self, plan: tuple[int, int, int]) -> Iterator[dict[str, Any]]:
        self._plan.copy_(torch.tensor(plan))
        self._pass += 1
        return self._take(iter(self._loader), self._pass)

    def _take(self, batches: Iterator[dict[str, Any]], number: int) -> Iterator[dict[str, Any]]:
        for batch in batches:
            if number != self._pass:  # the workers serve a newer pass now
                raise RuntimeError("a pass of a RunLoader was read after a newer one started")
            yield batch

    def close(self) -> None:
        """Stop the workers (at the run's end, and at once on Ctrl-C or SIGTERM); a later
        call starts new ones."""
        # A persistent DataLoader keeps its one iterator, and with it the workers, in
        # ``_iterator`` until it is collected: shut them down now, not at some later GC.
        iterator = self._loader._iterator
        self._loader._iterator = None
        if iterator is not None:
            iterator._shutdown_workers()  # type: ignore[attr-defined]

    def __enter__(self) -> RunLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TRAIN, _VAL = 0, 1  # RunLoader's kinds of pass


class _RunBatches(IterableDataset):
    """The dataset of a :class:`RunLoader`: each pass is what ``plan`` says when it starts."""

    def __init__(
        self,
        train: LoaderConfig,
        val: LoaderConfig,
        pools: dict[str, list[stream.Entry]],
        entries: list[stream.Entry],
        spec: stream.TrainSpec,
        eval_spec: stream.EvalSpec,
        plan: torch.Tensor,
    ) -> None:
        self.train, self.val, self.pools, self.entries = train, val, pools, entries
        self.spec, self.eval_spec, self.plan = spec, eval_spec, plan

    def train_spec(self, epoch: int, start_step: int) -> stream.TrainSpec:
        return replace(self.spec, epoch=epoch, start_step=start_step)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Read when the pass starts (not at the first batch): a batch of the pass before
        # may still be asked of this worker after the main process wrote the next plan.
        kind, epoch, start_step = self.plan.tolist()
        if kind == _VAL:
            return iter(EvalBatches(self.val, self.entries, self.eval_spec))
        return iter(TrainBatches(self.train, self.pools, self.train_spec(epoch, start_step)))
