"""The SIIM run-length encoding of pneumothorax masks (labels and submissions alike).

The encoding is *relative* and *column-major*, in both competition stages:

* a string of integer pairs ``gap length``; each gap counts from the end of the previous
  run (the first from pixel 0), so positions only ever move forward;
* pixels are numbered down the columns: decode into a flat array of ``width * height``,
  reshape to ``(width, height)`` and transpose to get the usual ``(rows, cols)`` image.

``-1`` (or an empty string) means an empty mask. A run past the end of the image is an
error, never silently clipped.
"""

from __future__ import annotations

import numpy as np

from shards.errors import PneumoError

EMPTY = "-1"


class RLEError(PneumoError):
    """An RLE string is malformed or runs past the end of the image."""


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode one SIIM RLE string into a ``(height, width)`` uint8 mask of 0/1.

    Raises:
        RLEError: odd number of values, a non-integer or negative value, or a run past the
            end of the image.
    """
    text = rle.strip()
    mask = np.zeros(width * height, dtype=np.uint8)
    if text in ("", EMPTY):
        return mask.reshape(width, height).T
    try:
        values = np.array([int(v) for v in text.split()], dtype=np.int64)
    except ValueError as e:
        raise RLEError(f"not a list of integers ({text[:40]!r}...)") from e
    if values.size % 2:
        raise RLEError(f"odd number of values ({values.size}): expected gap/length pairs")
    if (values < 0).any():
        raise RLEError("negative gap or length")
    gaps, lengths = values[0::2], values[1::2]
    if (lengths == 0).any():
        raise RLEError("a run of length 0")
    starts = np.cumsum(gaps + np.concatenate(([0], lengths[:-1])))
    ends = starts + lengths
    if ends[-1] > mask.size:
        raise RLEError(f"run ends at pixel {int(ends[-1])}, past the {height}x{width} image")
    # Mark run boundaries (+1 at a start, -1 at an end) and integrate: O(pixels), no loop.
    edges = np.zeros(mask.size + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    mask[:] = np.cumsum(edges[:-1]) > 0
    return mask.reshape(width, height).T


def rle_encode(mask: np.ndarray) -> str:
    """Encode a ``(height, width)`` mask (non-zero = foreground) as a SIIM RLE string.

    Returns ``"-1"`` for an empty mask. Adjacent foreground pixels form one run, so
    ``rle_encode(rle_decode(s))`` gives ``s`` back for every well-formed label string.
    """
    flat = (np.asarray(mask).T.reshape(-1) > 0).astype(np.int8)
    if not flat.any():
        return EMPTY
    diff = np.diff(np.concatenate(([0], flat, [0])))
    starts = np.flatnonzero(diff == 1)
    ends = np.flatnonzero(diff == -1)
    lengths = ends - starts
    gaps = starts - np.concatenate(([0], ends[:-1]))
    pairs = np.empty(2 * starts.size, dtype=np.int64)
    pairs[0::2], pairs[1::2] = gaps, lengths
    return " ".join(map(str, pairs.tolist()))


def combine_masks(rles: list[str], height: int, width: int) -> np.ndarray:
    """OR the instance masks of one image (183 SIIM images have overlapping instances)."""
    out = np.zeros((height, width), dtype=np.uint8)
    for rle in rles:
        np.bitwise_or(out, rle_decode(rle, height, width), out=out)
    return out
