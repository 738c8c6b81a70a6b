"""The SIIM RLE codec, on every row of the real stage-2 training labels and on hand-made cases."""

from __future__ import annotations

import csv
import gzip
import io
from collections import defaultdict

import numpy as np
import pytest
import sample_data

from pneumo.ingest.rle import RLEError, combine_masks, rle_decode, rle_encode

# The full sample set, or the part of it in tests/data (tests/sample_data.py).
DATA = sample_data.root()
TRAIN_RLE = DATA / "siim" / "siim-pneumothorax-train-rle.csv.gz"


def _rows() -> list[tuple[str, str]]:
    """(ImageId, EncodedPixels) of the real file, read with the csv module alone."""
    text = gzip.decompress(TRAIN_RLE.read_bytes()).decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    return [(image_id.strip(), rle.strip()) for image_id, rle in rows[1:]]


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, str]]:
    return _rows()


def test_real_file_has_the_documented_rows(rows: list[tuple[str, str]]) -> None:
    assert len(rows) == 12_954
    assert len({image_id for image_id, _ in rows}) == 12_047


@pytest.mark.slow
def test_every_real_row_decodes_and_encodes_back(rows: list[tuple[str, str]]) -> None:
    # rle_decode/rle_encode are pure: each distinct string (all 3,576 positives and "-1")
    # stands for every row that carries it.
    distinct = {rle for _, rle in rows}
    assert len(distinct) == 3_577
    mismatched = []
    for rle in distinct:
        mask = rle_decode(rle, 1024, 1024)
        assert mask.shape == (1024, 1024)
        assert mask.dtype == np.uint8
        assert (mask.any()) == (rle != "-1")
        if rle_encode(mask) != rle:
            mismatched.append(rle[:40])
    assert mismatched == []


@pytest.mark.slow
def test_overlapping_instances_are_ored_not_summed(rows: list[tuple[str, str]]) -> None:
    instances: dict[str, list[str]] = defaultdict(list)
    for image_id, rle in rows:
        if rle != "-1":
            instances[image_id].append(rle)
    overlapping = []
    for image_id, rles in instances.items():
        if len(rles) < 2:
            continue
        total = sum(rle_decode(r, 1024, 1024).astype(np.int32) for r in rles)
        if total.max() > 1:
            overlapping.append((image_id, rles, total))
    assert len(overlapping) == 183  # as counted in PROVENANCE.md
    _, rles, total = overlapping[0]
    combined = combine_masks(rles, 1024, 1024)
    assert combined.max() == 1
    assert np.array_equal(combined, (total > 0).astype(np.uint8))
    assert not np.array_equal(combined.astype(np.int32), total)


def test_runs_go_down_the_columns() -> None:
    # "0 3" on a 4x4 image: pixels 0-2 of the flat column-major order = column 0, rows 0-2.
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[0:3, 0] = 1
    assert np.array_equal(rle_decode("0 3", 4, 4), expected)
    assert rle_encode(expected) == "0 3"


def test_columns_have_height_pixels_on_a_non_square_image() -> None:
    # 2 rows x 3 columns: flat pixels 0-2 are column 0 (rows 0, 1), then column 1 row 0.
    mask = rle_decode("0 3", 2, 3)
    assert mask.shape == (2, 3)
    assert np.array_equal(mask, np.array([[1, 1, 0], [1, 0, 0]], dtype=np.uint8))
    assert rle_encode(mask) == "0 3"


def test_gaps_count_from_the_end_of_the_previous_run() -> None:
    # "1 2 3 1": run at 1-2, then 3 pixels after its end (pixel 3) -> pixel 6, not pixel 3.
    mask = rle_decode("1 2 3 1", 4, 4)
    flat = mask.T.reshape(-1)
    assert np.flatnonzero(flat).tolist() == [1, 2, 6]
    assert mask[2, 1] == 1 and mask[3, 0] == 0
    assert rle_encode(mask) == "1 2 3 1"


def test_whitespace_and_negative_markers() -> None:
    assert rle_decode(" 0 3 ", 4, 4).sum() == 3
    for empty in ("-1", " -1", "", "  "):
        assert rle_decode(empty, 4, 4).sum() == 0
    assert rle_encode(np.zeros((4, 4), dtype=np.uint8)) == "-1"


def test_whole_image_and_last_pixel() -> None:
    assert rle_decode("0 16", 4, 4).all()
    assert rle_encode(np.ones((4, 4))) == "0 16"
    mask = rle_decode("15 1", 4, 4)
    assert mask[3, 3] == 1 and mask.sum() == 1


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", "odd number of values (3): expected gap/length pairs"),
        ("0 17", "run ends at pixel 17, past the 4x4 image"),
        ("10 3 2 2", "run ends at pixel 17, past the 4x4 image"),
        ("a b", "not a list of integers ('a b'...)"),
        ("1.5 2", "not a list of integers ('1.5 2'...)"),
        ("1 " * 30 + "x", "not a list of integers ('" + "1 " * 20 + "'...)"),  # 40 chars of it
        ("-2 3", "negative gap or length (-2 3)"),
        ("0 0", "a run of length 0"),
    ],
)
def test_malformed_strings_raise_with_the_reason(rle: str, message: str) -> None:
    with pytest.raises(RLEError) as e:
        rle_decode(rle, 4, 4)
    assert str(e.value) == message


def test_combine_masks_raises_for_a_bad_instance() -> None:
    with pytest.raises(RLEError):
        combine_masks(["0 3", "0 99"], 4, 4)
