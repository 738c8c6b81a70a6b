"""The shard member readers: ingest's 1-bit mask PNGs without cv2, and JPEG frame headers."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumo.ingest.labels import read_siim_labels
from pneumo.ingest.rle import combine_masks
from pneumo.ingest.siim import encode_mask
from pneumo.shards.members import jpeg_sof, read_bilevel_png


def _cv2(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)


def test_real_siim_masks_read_as_cv2_reads_them(shared_data: Path) -> None:
    labels, _ = read_siim_labels(shared_data / "siim" / "sample_images" / "train-rle-sample.csv")
    positives = [label for label in labels.values() if label.rles]
    assert positives
    for label in positives:
        png = encode_mask(combine_masks(list(label.rles), 1024, 1024))
        mask = read_bilevel_png(png)
        assert mask is not None and mask.dtype == np.uint8
        assert np.array_equal(mask, _cv2(png)) and set(np.unique(mask)) == {0, 255}


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 50), (64, 9), (5, 1024)])
def test_odd_widths_and_heights(shape: tuple[int, int]) -> None:
    mask = (np.random.default_rng(sum(shape)).random(shape) < 0.4).astype(np.uint8)
    got = read_bilevel_png(encode_mask(mask))
    assert got is not None and np.array_equal(got, mask * 255)


def _png(raw: bytes, width: int = 4, height: int = 8) -> bytes:
    """A 1-bit grey PNG with ``raw`` (filter bytes and packed rows) as its image data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        (chunk(b"IHDR", header), chunk(b"IDAT", zlib.compress(raw)), chunk(b"IEND", b""))
    )


def test_other_pngs_are_left_to_a_full_decoder() -> None:
    raw = bytearray(8 * 2)  # 8 rows of (filter byte, 1 packed byte)
    raw[1 * 2 + 1] = 0b11110000  # row 1: four pixels set
    assert np.array_equal(read_bilevel_png(_png(bytes(raw))), _cv2(_png(bytes(raw))))
    raw[2 * 2] = 2  # row 2: filter Up with data 0, a copy of row 1
    filtered = _png(bytes(raw))
    assert read_bilevel_png(filtered) is None
    assert _cv2(filtered)[2].tolist() == [255] * 4  # the filtered row really is set
    grey8 = cv2.imencode(".png", np.full((4, 4), 255, np.uint8))[1].tobytes()
    assert read_bilevel_png(grey8) is None
    png = encode_mask(np.zeros((8, 4), np.uint8))
    assert read_bilevel_png(png[:-20]) is None  # cut inside the IDAT
    assert read_bilevel_png(_png(bytes(6 * 2))) is None  # 6 rows of data, 8 in the header
    assert read_bilevel_png(b"not a png") is None


def test_jpeg_sof_reads_the_frame_header() -> None:
    image = np.zeros((48, 80), np.uint8)
    frame = cv2.imencode(".jpg", image)[1].tobytes()
    assert jpeg_sof(frame) == (8, 48, 80, 1)
    colour = cv2.imencode(".jpg", np.zeros((16, 24, 3), np.uint8))[1].tobytes()
    assert jpeg_sof(colour) == (8, 16, 24, 3)
    assert jpeg_sof(b"\xff\xd8\xff\xda\x00\x02") is None  # scan data before any SOF
