"""Properties of the SIIM RLE codec on random masks and sizes (hypothesis).

The expected strings and masks come from the format's definition (../shared/DOMAIN.md),
written here pixel by pixel: pixels are numbered down the columns (flat position
``col * height + row``), each ``gap`` counts from the end of the previous run (the first
from pixel 0). Non-square sizes catch a swapped height and width; masks biased to full
columns, the first and the last pixel catch runs at the image's edges.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pneumo.ingest.rle import EMPTY, RLEError, combine_masks, rle_decode, rle_encode, rle_runs

PROPERTY = settings(max_examples=150, deadline=None, derandomize=True)


def encode_by_definition(mask: np.ndarray) -> str:
    """The SIIM string of ``mask``, one pixel at a time down the columns."""
    height, width = mask.shape
    values: list[int] = []
    end = 0  # where the previous run ended
    start = None
    for p in range(height * width + 1):
        on = p < height * width and bool(mask[p % height, p // height])
        if on and start is None:
            start = p
        elif not on and start is not None:
            values += [start - end, p - start]
            end, start = p, None
    return " ".join(map(str, values)) if values else "-1"


def decode_by_definition(rle: str, height: int, width: int) -> np.ndarray:
    """The ``(height, width)`` mask of ``rle``, one pixel at a time."""
    mask = np.zeros((height, width), dtype=np.uint8)
    values = [] if rle.strip() in ("", "-1") else [int(v) for v in rle.split()]
    end = 0
    for gap, length in zip(values[0::2], values[1::2], strict=True):
        for p in range(end + gap, end + gap + length):
            mask[p % height, p // height] = 1
        end += gap + length
    return mask


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    """A random 0/1 mask of a random size, often touching its edges or full."""
    height = draw(st.integers(1, 9))
    width = draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["random", "sparse", "full", "edges"]))
    bits = draw(st.lists(st.booleans(), min_size=height * width, max_size=height * width))
    mask = np.array(bits, dtype=np.uint8).reshape(height, width)
    if kind == "sparse":
        more = draw(st.lists(st.booleans(), min_size=mask.size, max_size=mask.size))
        mask &= np.array(more, dtype=np.uint8).reshape(height, width)
    elif kind == "full":
        mask[:] = 1
    elif kind == "edges":  # first pixel, last pixel, and a whole first and last column
        mask[0, 0] = mask[-1, -1] = 1
        mask[:, draw(st.sampled_from([0, width - 1]))] = 1
    return mask


@st.composite
def rle_strings(draw: st.DrawFn) -> tuple[str, int, int]:
    """A well-formed SIIM string (gaps >= 1 after the first, lengths >= 1) that fits."""
    height = draw(st.integers(1, 9))
    width = draw(st.integers(1, 9))
    left = height * width
    values: list[int] = []
    while left > 0 and draw(st.booleans()):
        gap = draw(st.integers(0 if not values else 1, left - 1 if not values else left))
        if gap >= left:
            break
        length = draw(st.integers(1, left - gap))
        values += [gap, length]
        left -= gap + length
    return (" ".join(map(str, values)) or EMPTY), height, width


@PROPERTY
@given(masks())
@example(np.ones((1, 1), dtype=np.uint8))
@example(np.eye(3, 5, dtype=np.uint8)[::-1])
def test_decode_of_encode_is_the_mask(mask: np.ndarray) -> None:
    height, width = mask.shape
    rle = rle_encode(mask)
    assert rle == encode_by_definition(mask)
    back = rle_decode(rle, height, width)
    assert back.shape == (height, width)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)


@PROPERTY
@given(rle_strings())
def test_decode_follows_the_definition_and_encode_gives_the_string_back(
    case: tuple[str, int, int],
) -> None:
    rle, height, width = case
    mask = rle_decode(rle, height, width)
    np.testing.assert_array_equal(mask, decode_by_definition(rle, height, width))
    assert rle_encode(mask) == rle


@PROPERTY
@given(masks(), st.integers(1, 3))
def test_a_run_one_pixel_past_the_end_is_an_error(mask: np.ndarray, extra: int) -> None:
    """A string ending exactly at the last pixel decodes; a longer last run never does."""
    height, width = mask.shape
    mask[-1, -1] = 1  # the last run ends at the image's last pixel
    values = [int(v) for v in rle_encode(mask).split()]
    assert sum(values) == height * width
    np.testing.assert_array_equal(rle_decode(" ".join(map(str, values)), height, width), mask)
    values[-1] += extra
    with pytest.raises(RLEError):
        rle_decode(" ".join(map(str, values)), height, width)


@PROPERTY
@given(st.lists(masks(), min_size=1, max_size=4))
def test_combined_instances_are_the_union(parts: list[np.ndarray]) -> None:
    """Instances of one image (cut to one size) OR together, overlaps included."""
    height = min(m.shape[0] for m in parts)
    width = min(m.shape[1] for m in parts)
    parts = [m[:height, :width] for m in parts]
    union = np.zeros((height, width), dtype=np.uint8)
    for m in parts:
        union |= m
    combined = combine_masks([rle_encode(m) for m in parts], height, width)
    np.testing.assert_array_equal(combined, union)
    runs = [r for m in parts for r in rle_runs(rle_encode(m), height, width)]
    assert all(0 <= start < end <= height * width for start, end in runs)
