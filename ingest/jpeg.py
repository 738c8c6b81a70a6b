"""Cheap checks of a stored JPEG frame (markers and start-of-frame header), no decoding.

Shared by both DICOM readers (``ingest.dicom`` through pydicom, ``ingest.dicom_lean``), so
a frame is judged the same way whichever reader found it.
"""

from __future__ import annotations

# JPEG start-of-frame markers (SOF0-SOF15 minus DHT C4, JPG C8 and DAC CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS = 0xDA  # start of scan: the entropy-coded data follows, no SOF after it


def frame_problem(frame: bytes, rows: int, cols: int) -> str | None:
    """Why ``frame`` is not an 8-bit one-component JPEG of ``rows`` x ``cols``; None if it is.

    ``frame`` must already be without its DICOM padding (see :func:`strip_padding`).
    """
    if not frame.startswith(b"\xff\xd8"):
        return "JPEG frame does not start with an SOI marker"
    if not frame.endswith(b"\xff\xd9"):
        return "JPEG frame is truncated (no EOI marker)"
    sof = jpeg_sof(frame)
    if sof is None:
        return "JPEG frame has no readable start-of-frame header"
    precision, height, width, components = sof
    if (height, width) != (rows, cols) or (precision, components) != (8, 1):
        return (
            f"JPEG frame is {width}x{height}, {precision}-bit, {components} component(s); "
            f"the header says {cols}x{rows}, 8-bit, 1 component"
        )
    return None


def strip_padding(frame: bytes) -> bytes:
    """Fragments have even length, so an odd-length frame ends with one 0x00 of padding."""
    return frame.rstrip(b"\x00")


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
