"""Batches for segmentation training and evaluation, streamed from a dataset's tar shards.

Which sample goes into which batch, for every rank and worker, is decided by
:mod:`pneumo.shards.stream`; this module makes those batches, in DataLoader workers. Each
worker yields whole batches: batch ``j`` of an epoch comes from worker ``j % workers``, so a
rank gets exactly ``steps_per_epoch`` batches whatever its share of the shards, and a run
resumed at ``(epoch, step)`` continues with the very batches (same keys, same augmentation)
an uninterrupted run would have seen, given the same ``workers`` and world size.
``workers=0`` reads in-process and gives the same batches as ``workers=1``.

A batch is a dict::

    image      uint8 [B, C, size, size], 0..255       (C = in_channels; 3 = the grey replicated)
               or float32 in [0, 1] when a sample is 16-bit
    mask       uint8 [B, 1, size, size], 0 or 1       (all zero without a mask member)
    key        list[str]                               sample keys in the shards
    image_id   list[str]
    has_ptx    bool [B]                                (False for unlabelled samples)
    labelled   bool [B]                                (has_ptx is not null)
    orig_size  list[(rows, cols)]                      of the stored image

Each sample is decoded, resized and augmented by :mod:`pneumo.training.decode`, then
written straight into the batch tensors (:func:`collate`): no per-sample float copies, no
stacking. The DataLoader and what its worker processes set up are
:mod:`pneumo.training.loader_workers`'s; a training run's loader, one set of workers for
all its passes, is :class:`pneumo.training.run_loader.RunLoader`.

8-bit images and masks travel as uint8, a quarter of float32's bytes through the workers'
shared memory (whose fresh pages cost more than the copy: ~0.9 ms a 512 px sample in
float32, ~0.3 ms in uint8) and to the GPU. ``pneumo.training.runs.images_to`` makes the floats
on the device: ``uint8 / 255``, the same float32 division the CPU would do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset

from pneumo.shards import elastic, manifest, selections, slots, stream
from pneumo.shards.cache import cached
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import Store, is_s3_url, open_store
from pneumo.training import augment
from pneumo.training.decode import decode_augmented
from pneumo.training.loader_workers import batch_tensor, dataloader, worker_id

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """How to stream batches from a dataset.

    ``where`` filters the manifest (default: the labelled SIIM training samples for
    training, the labelled SIIM validation samples for evaluation). ``pos_rate=(a, b)``
    draws positives with a probability sliding from ``a`` to ``b`` over training; ``None``
    keeps the natural mix.
    """

    dataset: str  # local folder or s3://bucket/prefix
    where: str | None = None
    size: int = 512
    batch_size: int = 8
    workers: int = 2
    seed: int = 0
    pos_rate: tuple[float, float] | None = None
    augment: bool = True
    in_channels: int = 1  # 1, or 3 (the grey image replicated)
    shuffle_buffer: int = stream.DEFAULT_SHUFFLE_BUFFER
    piece: int = slots.PIECE  # samples per ranged read of the training stream
    # An s3:// dataset's shards kept on local disk (pneumo.shards.cache): None, read each
    # epoch from the store; cache_limit: bytes the folder may hold.
    cache_dir: str | None = None
    cache_limit: int = 50 * 2**30

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ConfigError(f"--size {self.size} is too small (at least 8 pixels)")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.workers < 0:
            raise ConfigError("--workers must not be negative (0 reads in the main process)")
        if self.seed < 0:
            raise ConfigError("--seed must not be negative")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.shuffle_buffer < 1 or self.piece < 1:
            raise ConfigError("shuffle_buffer and piece must be at least 1")
        stream.check_pos_rate(self.pos_rate)

    @property
    def stream_workers(self) -> int:
        return max(self.workers, 1)


def select(dataset: str, where: str | None) -> pa.Table:
    """The manifest rows of ``dataset`` selected by ``where`` (all rows for ``None``)."""
    return manifest.read(open_store(dataset, create=False), where)


def steps_per_epoch(n_samples: int, batch_size: int, world_size: int) -> int:
    """One pass over ``n_samples`` in batches of ``batch_size`` on every rank (at least 1)."""
    return max(1, n_samples // (batch_size * world_size))


# ---------------------------------------------------------------- augmentation and batches


def collate(samples: list[dict[str, Any]], cfg: LoaderConfig, augmented: bool) -> dict[str, Any]:
    """Decode, augment (with each sample's ``__seed__``) and batch samples.

    Each sample is written straight into the batch tensors (uint8 image and 0/1 mask; the
    image as float32 / 255 when a sample of the batch is 16-bit): no per-sample copies, no
    stacking, no copy on the way out.
    """
    n, size, channels = len(samples), cfg.size, cfg.in_channels
    decoded = []
    for sample in samples:
        d = augment.draw(sample["__seed__"]) if augmented else augment.NO_AUGMENT
        decoded.append(decode_augmented(sample, size, d))
    eight_bit = all(image.dtype == np.uint8 for image, _, _ in decoded)
    image_t = batch_tensor((n, channels, size, size), torch.uint8 if eight_bit else torch.float32)
    mask_t = batch_tensor((n, 1, size, size), torch.uint8)
    images, masks = image_t.numpy(), mask_t.numpy()
    for i, (image, mask, _) in enumerate(decoded):
        if image.dtype == np.uint8 and not eight_bit:  # the float32 division of as_float
            np.divide(image, np.float32(255), out=images[i, 0])
        else:
            images[i, 0] = image
        masks[i, 0] = 0 if mask is None else mask
    if channels == 3:
        images[:, 1:] = images[:, :1]
    entries = [sample["__entry__"] for sample in samples]
    return {
        "image": image_t,
        "mask": mask_t,
        "key": [e.key for e in entries],
        "image_id": [e.image_id for e in entries],
        "has_ptx": torch.tensor([e.has_ptx is True for e in entries]),
        "labelled": torch.tensor([e.has_ptx is not None for e in entries]),
        "orig_size": [orig for _, _, orig in decoded],
    }


class TrainBatches(IterableDataset):
    """A pass of training batches: each loader worker plays its stream worker."""

    def __init__(self, cfg: LoaderConfig, pools: dict, spec: stream.TrainSpec) -> None:
        self.cfg, self.pools, self.spec = cfg, pools, spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader_worker = worker_id()
        worker = stream.logical_worker(loader_worker, self.spec.workers, self.spec.start_step)
        store = _shard_store(self.cfg)
        for _, samples in elastic.train_stream(store, self.pools, self.spec, worker):
            yield collate(samples, self.cfg, self.cfg.augment)


class EvalBatches(IterableDataset):
    """A pass of evaluation batches: each loader worker reads its share of the entries."""

    def __init__(self, cfg: LoaderConfig, entries: list, spec: stream.EvalSpec) -> None:
        self.cfg, self.entries, self.spec = cfg, entries, spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        store = _shard_store(self.cfg)
        for samples in stream.eval_stream(store, self.entries, self.spec, worker_id()):
            yield collate(samples, self.cfg, False)


def _shard_store(cfg: LoaderConfig) -> Store:
    """The store the stream reads shards from: an S3 dataset's through the node's shard
    cache when ``cfg.cache_dir`` is set (a local folder is read as it is)."""
    store = open_store(cfg.dataset, create=False)
    if cfg.cache_dir and is_s3_url(cfg.dataset):
        return cached(store, cfg.cache_dir, cfg.cache_limit)  # type: ignore[return-value]
    return store


def _batches(dataset: IterableDataset, cfg: LoaderConfig) -> Iterator[dict[str, Any]]:
    yield from dataloader(dataset, cfg.workers, persistent=False)


def train_batches(
    cfg: LoaderConfig,
    *,
    rank: int,
    world_size: int,
    epoch: int,
    steps_per_epoch: int,
    total_steps: int,
    start_step: int = 0,
    pools: dict[str, list[stream.Entry]] | None = None,
) -> Iterator[dict[str, Any]]:
    """This rank's training batches for ``epoch``, from ``start_step`` to ``steps_per_epoch``.

    Every rank gets exactly ``steps_per_epoch - start_step`` batches of ``batch_size``.
    Unlabelled samples are never trained on. The manifest is read and the stream's settings
    checked now; loader workers start on the first ``next()``.

    ``pools`` (class name -> entries, see :func:`pneumo.shards.stream.class_pools`) replaces the
    selection by ``cfg.where``: a training run pins its rows once at its start, and its
    task groups them into the classes the stream draws from.

    Raises:
        ConfigError: bad rank/step values, or nothing selected to train on.
        ManifestError: a malformed ``where``.
    """
    if pools is None:
        table = select(cfg.dataset, cfg.where or selections.SIIM_TRAIN)
        entries = stream.entries_from_table(table)
        labelled = [e for e in entries if e.has_ptx is not None]
        if len(labelled) < len(entries):
            log.warning("%d unlabelled samples left out of training", len(entries) - len(labelled))
        pools = stream.class_pools(labelled, cfg.pos_rate)
    spec = train_spec(
        cfg,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        start_step=start_step,
    )
    return _batches(TrainBatches(cfg, pools, spec), cfg)


def train_spec(cfg: LoaderConfig, **where: int) -> stream.TrainSpec:
    """The stream's settings of ``cfg`` at ``where`` (rank, world_size, epoch, steps...)."""
    return stream.TrainSpec(
        seed=cfg.seed,
        workers=cfg.stream_workers,
        batch_size=cfg.batch_size,
        pos_rate=cfg.pos_rate,
        shuffle_buffer=cfg.shuffle_buffer,
        piece=cfg.piece,
        **where,
    )


def eval_batches(
    cfg: LoaderConfig,
    *,
    rank: int,
    world_size: int,
    entries: list[stream.Entry] | None = None,
) -> Iterator[dict[str, Any]]:
    """This rank's share of the selected samples, each exactly once over all ranks, unaugmented.

    Ranks may get different numbers of batches (the last one of each worker is short):
    sum per-rank results and ``all_reduce`` the sums, and evaluate the bare model, not the
    DDP wrapper. Unlabelled samples are kept (``labelled`` False) for predictions.
    ``entries`` (a run's pinned validation rows) replaces the selection by ``cfg.where``.
    """
    if entries is None:
        entries = stream.entries_from_table(select(cfg.dataset, cfg.where or selections.SIIM_VAL))
    spec = stream.EvalSpec(
        rank=rank, world_size=world_size, workers=cfg.stream_workers, batch_size=cfg.batch_size
    )
    return _batches(EvalBatches(cfg, entries, spec), cfg)


def bench_loader(
    cfg: LoaderConfig, seconds: float, progress: Callable[[float, float], None] | None = None
) -> float:
    """Samples per second of the training stream (read, decode, resize, augment, collate).

    Timing starts after the first batch, so worker start-up and the first fill of the
    shuffle buffers are left out. ``progress(elapsed, seconds)`` is called after each batch.
    """
    if seconds <= 0:
        raise ConfigError(f"--seconds must be positive, got {seconds}")
    huge = 1 << 40  # one endless epoch
    batches = train_batches(
        cfg, rank=0, world_size=1, epoch=0, steps_per_epoch=huge, total_steps=huge
    )
    try:
        next(batches)
        start, samples, elapsed = time.perf_counter(), 0, 0.0
        while elapsed < seconds:
            samples += len(next(batches)["key"])
            elapsed = time.perf_counter() - start
            if progress is not None:
                progress(min(elapsed, seconds), seconds)
    finally:
        batches.close()  # type: ignore[attr-defined] - stops the loader workers
    return samples / elapsed
