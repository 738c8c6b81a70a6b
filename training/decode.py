"""A shard sample's image and mask members decoded to the arrays a batch is made of.

Kept apart from the loader (:mod:`pneumo.training.data`), which decides what a batch holds
and in which process it is made: decoding is what evaluation's predictions and the
pseudo-labels' outputs share with training (:func:`decode_image`), one sample at a time.

A JPEG is decoded by libjpeg-turbo at 1/2, 1/4 or 1/8 scale in the DCT
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
thresholded at one half.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from pneumo.shards.errors import PneumoError
from pneumo.shards.members import (
    ARRAY_SUFFIX,
    decode_array,
    image_suffix,
    jpeg_sof,
    read_bilevel_png,
)
from pneumo.training import augment

_REDUCED = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


class SampleError(PneumoError):
    """A sample in a shard cannot be decoded."""


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


def decode_augmented(
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
    image, mask, _ = decode_augmented(sample, size, augment.NO_AUGMENT)
    return image, (np.zeros((size, size), np.uint8) if mask is None else mask)
