"""Cheap checks of a stored JPEG frame (markers and start-of-frame header), no decoding.

Shared by both DICOM readers (``pneumo.ingest.dicom`` through pydicom,
``pneumo.ingest.dicom_lean``), so a frame is judged the same way whichever reader found it.
"""

from __future__ import annotations

from pneumo.shards.members import jpeg_sof


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
