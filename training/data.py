"""Batches for segmentation training and evaluation, streamed from a dataset's tar shards.

Which sample goes into which batch, for every rank and worker, is decided by
:mod:`pneumo.shards.stream`; this module decodes, resizes, augments and collates, in
DataLoader workers. Each worker yields whole batches: batch ``j`` of an epoch comes from
worker ``j % workers``, so a rank gets exactly ``steps_per_epoch`` batches whatever its
share of the shards, and a run resumed at ``(epoch, step)`` continues with the very batches
(same keys, same augmentation) an uninterrupted run would have seen, given the same
``workers`` and world size. ``workers=0`` reads in-process and gives the same batches as
``workers=1``.

A batch is a dict::

    image      uint8 [B, C, size, size], 0..255       (C = in_channels; 3 = the grey replicated)
               or float32 in [0, 1] when a sample is 16-bit
    mask       uint8 [B, 1, size, size], 0 or 1       (all zero without a mask member)
    key        list[str]                               sample keys in the shards
    image_id   list[str]
    has_ptx    bool [B]                                (False for unlabelled samples)
    labelled   bool [B]                                (has_ptx is not null)
    orig_size  list[(rows, cols)]                      of the stored image

Decoding: a JPEG is decoded by libjpeg-turbo at 1/2, 1/4 or 1/8 scale in the DCT
(``cv2.IMREAD_REDUCED_GRAYSCALE_*``: the smallest scale still at least ``size``), a PNG
through ``cv2.imdecode``, a 16-bit ``.npy.gz`` member by zlib and numpy; ingest's 1-bit
mask PNGs are inflated and unpacked with numpy (``pneumo.shards.members``). Then one step
resizes to ``size`` and augments (``pneumo.training.augment``: a horizontal flip and a mild
affine, the distribution of the albumentations pipeline the loader used to run, as one
``cv2.warpAffine``); unaugmented (evaluation) it is an area resize. Images are squashed to
a square (SIIM and NIH are square already). 16-bit images (``KEY.npy.gz``, or a 16-bit
``KEY.png`` of a dataset written before) are windowed to [0, 1] by their own 0.5th and
99.5th percentiles, since they rarely use their full range and say nothing of their real
bit depth. Masks are binarised (any non-zero value), resized or warped with the image and
thresholded at one half. Each sample is written straight into the batch tensors: no
per-sample float copies, no stacking.

8-bit images and masks travel as uint8, a quarter of float32's bytes through the workers'
shared memory (whose fresh pages cost more than the copy: ~0.9 ms a 512 px sample in
float32, ~0.3 ms in uint8) and to the GPU. ``pneumo.training.runs.images_to`` makes the floats
on the device: ``uint8 / 255``, the same float32 division the CPU would do.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pneumo.shards import elastic, manifest, selections, slots, stream
from pneumo.shards.cache import cached
from pneumo.shards.errors import ConfigError, PneumoError
from pneumo.shards.members import (
    ARRAY_SUFFIX,
    decode_array,
    image_suffix,
    jpeg_sof,
    read_bilevel_png,
)
from pneumo.shards.store import Store, is_s3_url, open_store
from pneumo.training import augment

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 2  # per worker
_REDUCED = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


class SampleError(PneumoError):
    """A sample in a shard cannot be decoded."""


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


# ---------------------------------------------------------------- decoding


def decode_image(data: bytes, suffix: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An image member as ``[size, size]`` (uint8, or float32 in [0, 1] from 16 bits).

    Returns the image and the stored image's ``(rows, cols)``.
    """
    pixels, orig = _read_image(data, suffix, size)
    pixels = augment.apply(pixels, augment.NO_AUGMENT, size)
    return (_window(pixels) if pixels.dtype == np.uint16 else pixels), orig


def _read_image(data: bytes, suffix: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The stored image decoded, a JPEG reduced in the DCT to the smallest 1/2, 1/4 or 1/8
    scale still at least ``size`` on both sides; uint8 or uint16. Returns it and the
    stored ``(rows, cols)``."""
    buffer = np.frombuffer(data, np.uint8)
    if suffix == "jpg":
        rows, cols = _jpeg_size(data)
        factor = max((f for f in (8, 4, 2) if -(-min(rows, cols) // f) >= size), default=1)
        pixels = cv2.imdecode(buffer, _REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
        if pixels is None:
            raise ValueError("not a JPEG cv2 can read")
        return pixels, (rows, cols)
    if suffix == ARRAY_SUFFIX:
        pixels = decode_array(data)
        return pixels, pixels.shape
    pixels = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("not a PNG cv2 can read")
    if pixels.ndim == 3:  # cv2 orders colours BGR(A): the PNG's first channel is last
        pixels = pixels[..., 2] if pixels.shape[2] >= 3 else pixels[..., 0]
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"unsupported pixel type {pixels.dtype}")
    return pixels, pixels.shape


def _jpeg_size(data: bytes) -> tuple[int, int]:
    sof = jpeg_sof(data)
    if sof is None:
        raise ValueError("not a JPEG: no start-of-frame header")
    return sof[1], sof[2]


def _window(pixels: np.ndarray) -> np.ndarray:
    # Percentiles of every 4th row and column: the same numbers, 16 times less sorting.
    lo, hi = np.percentile(pixels[::4, ::4], (0.5, 99.5))
    scale = np.float32(1.0 / max(float(hi - lo), 1.0))
    return np.clip((pixels.astype(np.float32) - np.float32(lo)) * scale, 0.0, 1.0)


def decode_mask(data: bytes | None, size: int) -> np.ndarray:
    """A mask member (or none) as uint8 ``[size, size]`` of 0 and 1 (area-resized, then
    thresholded at one half)."""
    if data is None:
        return np.zeros((size, size), np.uint8)
    return _binary(augment.apply(_read_mask(data), augment.NO_AUGMENT, size))


def _read_mask(data: bytes) -> np.ndarray:
    """A mask member at its stored size as uint8 0/255 (any non-zero value is foreground);
    ingest's 1-bit PNGs without cv2 (see ``pneumo.shards.members``)."""
    mask = read_bilevel_png(data)
    if mask is not None:
        return mask
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError("mask.png is not a PNG cv2 can read")
    return cv2.threshold(mask, 0, 255, cv2.THRESH_BINARY)[1]


def _binary(mask: np.ndarray) -> np.ndarray:
    """0/255 (or area-averaged) -> 0/1 at one half."""
    return cv2.threshold(mask, 127, 1, cv2.THRESH_BINARY)[1]


def _decode(
    sample: dict[str, Any], size: int, d: augment.Draw
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """A sample's image and mask (None: empty), resized to ``size`` and augmented by ``d``."""
    suffix = image_suffix(sample)
    where = f"sample {sample.get('__key__')} of {sample.get('__shard__')}"
    if suffix is None:
        raise SampleError(f"{where} has no .jpg, .png or .npy.gz image; re-run its ingest")
    entry = sample.get("__entry__")
    # A negative's mask is empty by definition: skip inflating a 1024x1024 PNG of zeros.
    mask_png = None if entry is not None and entry.has_ptx is False else sample.get("mask.png")
    try:
        pixels, orig = _read_image(sample[suffix], suffix, size)
        if pixels.dtype == np.uint16:  # window before the warp: its border is then 0
            pixels = _window(augment.apply(pixels, augment.NO_AUGMENT, size))
        image = augment.apply(pixels, d, size)
        mask = None if mask_png is None else _binary(augment.apply(_read_mask(mask_png), d, size))
    except (OSError, ValueError, cv2.error) as e:
        raise SampleError(f"{where} cannot be decoded: {e}") from e
    return image, mask, orig


def decode_sample(sample: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard sample's image (uint8, or float32 for 16 bits) and 0/1 uint8 mask, both
    ``[size, size]``, unaugmented. A sample the stream marks negative (``__entry__.has_ptx``
    False) gets an all-zero mask without its stored mask being decoded.

    Raises:
        SampleError: the sample has no image, or its bytes do not decode.
    """
    image, mask, _ = _decode(sample, size, augment.NO_AUGMENT)
    return image, (np.zeros((size, size), np.uint8) if mask is None else mask)


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
        decoded.append(_decode(sample, size, d))
    eight_bit = all(image.dtype == np.uint8 for image, _, _ in decoded)
    image_t = _batch_tensor((n, channels, size, size), torch.uint8 if eight_bit else torch.float32)
    mask_t = _batch_tensor((n, 1, size, size), torch.uint8)
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


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a loader worker, in shared memory already.

    A worker's batch travels to the main process through shared memory: made there from
    the start (as torch's ``default_collate`` does), it is not copied into it on the way.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class _TrainBatches(IterableDataset):
    def __init__(self, cfg: LoaderConfig, pools: dict, spec: stream.TrainSpec) -> None:
        self.cfg, self.pools, self.spec = cfg, pools, spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader_worker = _worker_id()
        worker = stream.logical_worker(loader_worker, self.spec.workers, self.spec.start_step)
        store = _shard_store(self.cfg)
        for _, samples in elastic.train_stream(store, self.pools, self.spec, worker):
            yield collate(samples, self.cfg, self.cfg.augment)


class _EvalBatches(IterableDataset):
    def __init__(self, cfg: LoaderConfig, entries: list, spec: stream.EvalSpec) -> None:
        self.cfg, self.entries, self.spec = cfg, entries, spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        store = _shard_store(self.cfg)
        for samples in stream.eval_stream(store, self.entries, self.spec, _worker_id()):
            yield collate(samples, self.cfg, False)


def _shard_store(cfg: LoaderConfig) -> Store:
    """The store the stream reads shards from: an S3 dataset's through the node's shard
    cache when ``cfg.cache_dir`` is set (a local folder is read as it is)."""
    store = open_store(cfg.dataset, create=False)
    if cfg.cache_dir and is_s3_url(cfg.dataset):
        return cached(store, cfg.cache_dir, cfg.cache_limit)  # type: ignore[return-value]
    return store


def _worker_id() -> int:
    # Leave cv2's threads alone here: cv2.setNumThreads in a forked worker waits forever on
    # the thread pool it inherited from the parent.
    info = get_worker_info()
    return 0 if info is None else info.id


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _batches(dataset: IterableDataset, cfg: LoaderConfig) -> Iterator[dict[str, Any]]:
    yield from _loader(dataset, cfg.workers, persistent=False)


def _loader(dataset: IterableDataset, workers: int, *, persistent: bool) -> DataLoader:
    """A DataLoader of whole batches. It has its own generator: starting an iterator draws
    the workers' base seed, which from torch's global RNG would shift every later draw of
    the training (a VAE's noise) by one, and a resumed run would no longer follow the
    uninterrupted one. The stream needs no worker seed: every sample carries its own."""
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        collate_fn=_as_is,  # already tensors; default_convert would turn tuples into lists
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=persistent and workers > 0,
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        worker_init_fn=_worker_signals,
        generator=torch.Generator().manual_seed(0),
    )


def _worker_signals(_worker: int) -> None:
    """Ctrl-C and SIGTERM are the parent's to handle (one line, see pneumo.render; training
    saves its place first), and it shuts the workers down. A loader worker ignores Ctrl-C
    (it would print its own traceback), and leaves at once on SIGTERM, quietly and with
    status 0, whoever sent it: the whole group killed (timeout, systemd, Slurm), or the
    parent's shutdown. A worker killed by the signal itself would make torch raise "worker
    killed by signal" in the parent, perhaps while it saves the checkpoint (torch's own
    handler exits with 0 only for a SIGTERM from the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave)
    sys.excepthook = _quiet_when_the_parent_hangs_up(sys.excepthook)


def _leave(signum: int, frame: FrameType | None) -> None:
    os._exit(0)


def _quiet_when_the_parent_hangs_up(hook: Callable[..., Any]) -> Callable[..., None]:
    """``hook``, silent for the error a worker sees when the training process stops in the
    middle of taking a batch (Ctrl-C, SIGTERM): a batch's tensors go to the parent as file
    descriptors, served by a thread of the worker (multiprocessing's resource sharer) that
    reports any error through ``sys.excepthook``; a parent that leaves mid-transfer gives it
    a broken pipe or an early end of data, and it would print a traceback after the
    parent's one line. Other errors are shown as before."""

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, (ConnectionError, EOFError)):
            return
        hook(kind, value, tb)

    return excepthook


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
    spec = _train_spec(
        cfg,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        start_step=start_step,
    )
    return _batches(_TrainBatches(cfg, pools, spec), cfg)


def _train_spec(cfg: LoaderConfig, **where: int) -> stream.TrainSpec:
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
    return _batches(_EvalBatches(cfg, entries, spec), cfg)


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
    :func:`train_batches` / :func:`eval_batches` would, so the batches are exactly theirs;
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
        spec = _train_spec(
            train, rank=rank, world_size=world_size, epoch=0, steps_per_epoch=steps_per_epoch,
            total_steps=total_steps, plan_world_size=plan_world, plan_workers=plan_workers,
        )  # fmt: skip
        eval_spec = stream.EvalSpec(
            rank=rank, world_size=world_size, workers=val.stream_workers, batch_size=val.batch_size
        )
        self._dataset = _RunBatches(train, val, pools, val_entries, spec, eval_spec, self._plan)
        self._loader = _loader(self._dataset, train.workers, persistent=True)
        self._pass = 0

    def train(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's training batches of ``epoch`` from ``start_step`` on (what
        :func:`train_batches` gives for them); the pass starts now."""
        self._dataset.train_spec(epoch, start_step)  # bad values: ConfigError here, not in a worker
        return self._start((_TRAIN, epoch, start_step))

    def val(self) -> Iterator[dict[str, Any]]:
        """This rank's share of the validation entries (what :func:`eval_batches` gives)."""
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
            return iter(_EvalBatches(self.val, self.entries, self.eval_spec))
        return iter(_TrainBatches(self.train, self.pools, self.train_spec(epoch, start_step)))


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
