"""Batches for segmentation training and evaluation, streamed from a dataset's tar shards.

The plan (which sample goes into which batch, for every rank and worker) is
:mod:`shards.stream`'s; this module decodes, resizes, augments and collates, in DataLoader
workers. Each worker yields whole batches: batch ``j`` of an epoch comes from worker
``j % workers``, so a rank gets exactly ``steps_per_epoch`` batches whatever its share of
the shards, and a run resumed at ``(epoch, step)`` continues with the very batches (same
keys, same augmentation) an uninterrupted run would have seen, given the same ``workers``
and world size. ``workers=0`` reads in-process and gives the same batches as ``workers=1``.

A batch is a dict::

    image      float32 [B, C, size, size] in [0, 1]   (C = in_channels; 3 = the grey replicated)
    mask       float32 [B, 1, size, size], 0 or 1     (all zero without a mask member)
    key        list[str]                               sample keys in the shards
    image_id   list[str]
    has_ptx    bool [B]                                (False for unlabelled samples)
    labelled   bool [B]                                (has_ptx is not null)
    orig_size  list[(rows, cols)]                      of the stored image

Decoding: JPEG through Pillow's ``draft`` (the decoder itself scales by 1/2, 1/4 or 1/8 in
the DCT domain, several times faster than a full decode) then ``cv2.INTER_AREA`` to
``size``; PNG through ``cv2.imdecode``; images are squashed to a square (SIIM and NIH are
square already). 16-bit PNGs are windowed to [0, 1] by their own 0.5th and 99.5th
percentiles, since a 16-bit PNG rarely uses its full range and says nothing of its real bit
depth. Masks are binarised (``> 0``: 0/255 and 0/1 both work), resized by area and
thresholded at one half.
"""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import manifest, stream
from shards.errors import ConfigError, PneumoError
from shards.store import open_store

log = logging.getLogger(__name__)

DEFAULT_TRAIN_WHERE = "split == 'train' and has_ptx is not None"
DEFAULT_EVAL_WHERE = "split == 'val' and has_ptx is not None"
PREFETCH_BATCHES = 2  # per worker


class SampleError(PneumoError):
    """A sample in a shard cannot be decoded."""


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """How to stream batches from a dataset.

    ``where`` filters the manifest (default: labelled training samples for training,
    labelled validation samples for evaluation). ``pos_rate=(a, b)`` draws positives with a
    probability sliding from ``a`` to ``b`` over training; ``None`` keeps the natural mix.
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
        if self.shuffle_buffer < 1:
            raise ConfigError("shuffle_buffer must be at least 1")
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
    if suffix == "jpg":
        with Image.open(io.BytesIO(data)) as im:
            cols, rows = im.size
            im.draft("L", (size, size))  # DCT-domain downscale, never below size
            pixels = np.asarray(im.convert("L"))
    else:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if pixels is None:
            raise ValueError("not a PNG cv2 can read")
        if pixels.ndim == 3:  # cv2 orders colours BGR(A): the PNG's first channel is last
            pixels = pixels[..., 2] if pixels.shape[2] >= 3 else pixels[..., 0]
        rows, cols = pixels.shape
    if pixels.shape != (size, size):
        pixels = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
    if pixels.dtype == np.uint16:
        return _window(pixels), (rows, cols)
    if pixels.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {pixels.dtype}")
    return pixels, (rows, cols)


def _window(pixels: np.ndarray) -> np.ndarray:
    # Percentiles of every 4th row and column: the same numbers, 16 times less sorting.
    lo, hi = np.percentile(pixels[::4, ::4], (0.5, 99.5))
    scale = np.float32(1.0 / max(float(hi - lo), 1.0))
    return np.clip((pixels.astype(np.float32) - np.float32(lo)) * scale, 0.0, 1.0)


def decode_mask(data: bytes | None, size: int) -> np.ndarray:
    """A mask member (or none) as uint8 ``[size, size]`` of 0 and 1."""
    if data is None:
        return np.zeros((size, size), np.uint8)
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError("mask.png is not a PNG cv2 can read")
    if mask.shape != (size, size):
        binary = np.where(mask > 0, np.uint8(255), np.uint8(0))
        return (cv2.resize(binary, (size, size), interpolation=cv2.INTER_AREA) >= 128).astype(
            np.uint8
        )
    return (mask > 0).astype(np.uint8)


def _decode(sample: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    suffix = "jpg" if "jpg" in sample else "png"
    where = f"sample {sample.get('__key__')} of {sample.get('__shard__')}"
    if suffix not in sample:
        raise SampleError(f"{where} has no .jpg or .png image; re-run its ingest")
    entry = sample.get("__entry__")
    # A negative's mask is empty by definition: skip inflating a 1024x1024 PNG of zeros.
    mask_png = None if entry is not None and entry.has_ptx is False else sample.get("mask.png")
    try:
        image, orig = decode_image(sample[suffix], suffix, size)
        mask = decode_mask(mask_png, size)
    except (OSError, ValueError, cv2.error) as e:
        raise SampleError(f"{where} cannot be decoded: {e}") from e
    return image, mask, orig


def decode_sample(sample: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard sample's image (uint8, or float32 for 16 bits) and 0/1 uint8 mask, both
    ``[size, size]``. A sample the stream marks negative (``__entry__.has_ptx`` False) gets
    an all-zero mask without its stored mask being decoded.

    Raises:
        SampleError: the sample has no image, or its bytes do not decode.
    """
    image, mask, _ = _decode(sample, size)
    return image, mask


# ---------------------------------------------------------------- augmentation and batches


def build_augment() -> A.Compose:
    """Horizontal flip and a mild affine, applied jointly to image and mask."""
    affine = A.Affine(
        scale=(0.9, 1.1),
        translate_percent=(-0.06, 0.06),
        rotate=(-10, 10),
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=0,
        p=0.7,
    )
    return A.Compose([A.HorizontalFlip(p=0.5), affine])


def augment(
    compose: A.Compose, image: np.ndarray, mask: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``compose`` on one sample, its random choices taken from ``seed`` alone."""
    # One generator shared by all transforms: Compose.set_random_seed would give each
    # transform its own generator with the same seed, and correlate flip with affine.
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
    out = compose(image=image, mask=mask)
    return out["image"], out["mask"]


def collate(
    samples: list[dict[str, Any]], cfg: LoaderConfig, compose: A.Compose | None
) -> dict[str, Any]:
    """Decode, augment (with each sample's ``__seed__``) and stack samples into a batch."""
    images, masks, origs = [], [], []
    for sample in samples:
        image, mask, orig = _decode(sample, cfg.size)
        if compose is not None:
            image, mask = augment(compose, image, mask, sample["__seed__"])
        images.append(image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image)
        masks.append(mask)
        origs.append(orig)
    image_t = torch.from_numpy(np.stack(images)[:, None])
    if cfg.in_channels == 3:
        image_t = image_t.repeat(1, 3, 1, 1)
    entries = [sample["__entry__"] for sample in samples]
    return {
        "image": image_t,
        "mask": torch.from_numpy(np.stack(masks)[:, None]).float(),
        "key": [e.key for e in entries],
        "image_id": [e.image_id for e in entries],
        "has_ptx": torch.tensor([e.has_ptx is True for e in entries]),
        "labelled": torch.tensor([e.has_ptx is not None for e in entries]),
        "orig_size": origs,
    }


class _TrainBatches(IterableDataset):
    def __init__(self, cfg: LoaderConfig, pools: dict, spec: stream.TrainSpec) -> None:
        self.cfg, self.pools, self.spec = cfg, pools, spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader_worker = _worker_id()
        worker = stream.logical_worker(loader_worker, self.spec.workers, self.spec.start_step)
        store = open_store(self.cfg.dataset, create=False)
        compose = build_augment() if self.cfg.augment else None
        for _, samples in stream.train_stream(store, self.pools, self.spec, worker):
            yield collate(samples, self.cfg, compose)


class _EvalBatches(IterableDataset):
    def __init__(self, cfg: LoaderConfig, entries: list, spec: stream.EvalSpec) -> None:
        self.cfg, self.entries, self.spec = cfg, entries, spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        store = open_store(self.cfg.dataset, create=False)
        for samples in stream.eval_stream(store, self.entries, self.spec, _worker_id()):
            yield collate(samples, self.cfg, None)


def _worker_id() -> int:
    # Leave cv2's threads alone here: cv2.setNumThreads in a forked worker waits forever on
    # the thread pool it inherited from the parent.
    info = get_worker_info()
    return 0 if info is None else info.id


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _batches(dataset: IterableDataset, cfg: LoaderConfig) -> Iterator[dict[str, Any]]:
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        collate_fn=_as_is,  # already tensors; default_convert would turn tuples into lists
        num_workers=cfg.workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=PREFETCH_BATCHES if cfg.workers > 0 else None,
    )
    yield from loader


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
    Unlabelled samples are never trained on. The manifest is read and the plan checked
    now; loader workers start on the first ``next()``.

    ``pools`` (class name -> entries, see :func:`shards.stream.class_pools`) replaces the
    selection by ``cfg.where``: a training run pins its rows once at its start, and its
    task groups them into the classes the stream draws from.

    Raises:
        ConfigError: bad rank/step values, or nothing selected to train on.
        ManifestError: a malformed ``where``.
    """
    if pools is None:
        table = select(cfg.dataset, cfg.where or DEFAULT_TRAIN_WHERE)
        entries = stream.entries_from_table(table)
        labelled = [e for e in entries if e.has_ptx is not None]
        if len(labelled) < len(entries):
            log.warning("%d unlabelled samples left out of training", len(entries) - len(labelled))
        pools = stream.class_pools(labelled, cfg.pos_rate)
    spec = stream.TrainSpec(
        seed=cfg.seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        workers=cfg.stream_workers,
        batch_size=cfg.batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        start_step=start_step,
        pos_rate=cfg.pos_rate,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    return _batches(_TrainBatches(cfg, pools, spec), cfg)


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
        entries = stream.entries_from_table(select(cfg.dataset, cfg.where or DEFAULT_EVAL_WHERE))
    spec = stream.EvalSpec(
        rank=rank, world_size=world_size, workers=cfg.stream_workers, batch_size=cfg.batch_size
    )
    return _batches(_EvalBatches(cfg, entries, spec), cfg)


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
