"""The image members a shard stores, and cheap readers of them, shared by ingest and training.

A sample has one image member (:data:`IMAGE_SUFFIXES`): ``KEY.jpg`` (8-bit, a DICOM's JPEG
frame as it is), ``KEY.png`` (8-bit grey) or ``KEY.npy.gz`` (16-bit: a gzip-compressed NumPy
``.npy`` array of uint16). 16-bit images are not PNGs because webdataset's standard image
decoders (``decode("l8")``, ``"rgb8"``, ``"pil"``, ``"torch"``, ...) open every image
extension (png, tif, pgm, jp2, ...) with Pillow and convert it to 8 bits, which clips every
value above 255: a chest X-ray comes out solid white, silently. A ``.npy.gz`` member goes
through webdataset's default handlers instead (gunzip, then ``numpy.lib.format.read_array``)
and comes out as the exact uint16 array whatever decoder a reader names; it costs about
1.2-1.5x the bytes of a 16-bit PNG. Datasets written before keep their 16-bit ``KEY.png``
members; pneumo reads both.

* :func:`encode_array`, :func:`decode_array`: the ``.npy.gz`` member, with bytes that are
  a function of the pixels only (no time or name in the gzip header).
* :func:`jpeg_sof`: a JPEG frame's size, precision and components from its start-of-frame
  header (ingest checks a DICOM's frame with it; the loader picks its DCT scale with it).
* :func:`read_bilevel_png`: ingest's 1-bit mask PNGs, inflated and unpacked with zlib and
  numpy (0.2 ms at 1024 px against 1.9 ms through cv2, the loader's hot path for positives).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping

import numpy as np

# The image member's suffix (as webdataset sees it: everything after the key's first dot), by
# the manifest's ``image_format``. A sample holds exactly one of them.
SUFFIX_OF_FORMAT = {"jpeg": "jpg", "png": "png", "npy": "npy.gz"}
IMAGE_SUFFIXES = tuple(SUFFIX_OF_FORMAT.values())
ARRAY_FORMAT, ARRAY_SUFFIX = "npy", SUFFIX_OF_FORMAT["npy"]

# gzip (RFC 1952) around a raw deflate stream: no name, mtime 0, OS "unknown" (255), so the
# bytes do not depend on the time, the platform or Python's gzip module (which writes other
# header bytes in other versions).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_GZIP_LEVEL = 6  # zlib's default: level 9 gains nothing on chest X-rays, at 1.2x the time
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # tells zlib to expect (and check) the gzip wrapper

# JPEG start-of-frame markers (SOF0-SOF15 minus DHT C4, JPG C8 and DAC CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS = 0xDA  # start of scan: the entropy-coded data follows, no SOF after it
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBBBBB")


def image_suffix(sample: Mapping[str, object]) -> str | None:
    """The suffix of ``sample``'s image member (``jpg``, ``png`` or ``npy.gz``); None if none."""
    return next((s for s in IMAGE_SUFFIXES if s in sample), None)


def encode_array(pixels: np.ndarray) -> bytes:
    """A 2-D uint8/uint16 image as a ``.npy.gz`` member: ``.npy`` version 1.0, little-endian,
    C order, gzip-compressed. The same pixels always give the same bytes (for a given zlib).

    Raises:
        ValueError: not a 2-D uint8 or uint16 array.
    """
    if pixels.ndim != 2 or pixels.dtype.kind != "u" or pixels.itemsize not in (1, 2):
        raise ValueError(f"expected a 2-D uint8 or uint16 image, got {pixels.dtype} {pixels.shape}")
    npy = io.BytesIO()
    values = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    np.lib.format.write_array(npy, values, version=(1, 0), allow_pickle=False)
    raw = npy.getbuffer()
    deflate = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(raw) + deflate.flush()
    trailer = struct.pack("<II", zlib.crc32(raw), raw.nbytes & 0xFFFFFFFF)
    return _GZIP_HEADER + body + trailer


def decode_array(data: bytes) -> np.ndarray:
    """A ``.npy.gz`` member as a 2-D uint8 or uint16 array (native byte order).

    Raises:
        ValueError: not gzip, a damaged stream (zlib checks its CRC and length), not a
            ``.npy``, or not a 2-D uint8/uint16 array.
    """
    try:
        raw = zlib.decompress(data, _GZIP_WBITS)
        pixels = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except zlib.error as e:
        raise ValueError(f"not a gzip-compressed .npy member ({e})") from e
    if pixels.ndim != 2 or pixels.dtype.kind != "u" or pixels.itemsize not in (1, 2):
        raise ValueError(
            f"a .npy.gz image must be 2-D uint8 or uint16, not {pixels.dtype} {pixels.shape}"
        )
    return pixels.astype(pixels.dtype.newbyteorder("="), copy=False)


def jpeg_sof(frame: bytes) -> tuple[int, int, int, int] | None:
    """(precision, height, width, components) from the JPEG start-of-frame segment.

    Walks the marker segments up to the first SOF; a few dozen bytes of work. None when
    there is no SOF before the scan data.
    """
    pos, end = 2, len(frame)
    while pos + 4 <= end:
        if frame[pos] != 0xFF:
            break
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _SOF_MARKERS and pos + 10 <= end:
            height = int.from_bytes(frame[pos + 5 : pos + 7], "big")
            width = int.from_bytes(frame[pos + 7 : pos + 9], "big")
            return frame[pos + 4], height, width, frame[pos + 9]
        if marker == _SOS:
            break
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    return None


def read_bilevel_png(data: bytes) -> np.ndarray | None:
    """A 1-bit greyscale, non-interlaced PNG whose rows are all unfiltered, as uint8 0/255.

    That is what ingest writes for masks. None for any other PNG (or a broken one): the
    caller then decodes it with a general decoder, which also words the error.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    try:
        header, idat = _chunks(data)
        width, height, depth, colour, _, _, interlace = _IHDR.unpack(header)
        if (depth, colour, interlace) != (1, 0, 0) or not width or not height:
            return None
        stride = (width + 7) // 8 + 1  # a filter byte, then the packed row
        raw = np.frombuffer(zlib.decompress(idat), np.uint8)
    except (struct.error, zlib.error, ValueError):
        return None
    if raw.size != height * stride:
        return None
    rows = raw.reshape(height, stride)
    if rows[:, 0].any():  # a filtered row: leave it to a full decoder
        return None
    bits = np.unpackbits(rows[:, 1:], axis=1, count=width)
    return np.multiply(bits, np.uint8(255), out=bits)


def _chunks(data: bytes) -> tuple[bytes, bytes]:
    """(IHDR data, all IDAT data joined); ValueError when either is missing."""
    pos, header, idat = len(_PNG_SIGNATURE), b"", []
    while pos + 8 <= len(data):
        length, kind = _CHUNK.unpack_from(data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if len(header) != _IHDR.size or not idat:
        raise ValueError("no IHDR or IDAT")
    return header, b"".join(idat)
