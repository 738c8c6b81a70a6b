"""Read one DICOM file into what a shard stores: image bytes plus a few header fields.

* **Pass-through**: a single-frame 8-bit MONOCHROME2 JPEG Baseline image (every SIIM file)
  keeps its encapsulated JPEG frame as it is: no decode, no second lossy generation. The
  frame is checked cheaply (SOI/EOI markers, SOF header against Rows/Columns), not decoded.
  Such files are read by ``pneumo.ingest.dicom_lean`` (element headers walked, no pydicom Dataset:
  about 20x faster); any file it declines goes through pydicom, as do all errors.
* **Decode**: anything else (JPEG 2000, uncompressed, MONOCHROME1, colour, multi-frame) is
  decoded by pydicom (Pillow plugin) and stored as a lossless PNG of the source values,
  8-bit when BitsStored <= 8, else 16-bit. No windowing, no rescale. Bone is bright:
  MONOCHROME1 is inverted as ``(2**BitsStored - 1) - x``.

Privacy: the patient ids (PatientID, IssuerOfPatientID, OtherPatientIDs) only go to
``patient_ids``, for keyed hashing by the caller; its repr shows none of them. No message
or log line carries patient data, so pydicom's value validation (its messages quote values)
is switched off while we read.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import UID, JPEGBaseline8Bit

from pneumo.ingest.dicom_lean import read_lean
from pneumo.ingest.jpeg import frame_problem, strip_padding
from pneumo.ingest.patients import DICOM_PATIENT_ATTRIBUTES
from pneumo.shards.errors import PneumoError

log = logging.getLogger(__name__)

MAX_AGE_YEARS = 120.0
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([DWMY]?)", re.IGNORECASE)
_YEARS_PER_UNIT = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365, "D": 1 / 365}
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
# (implicit VR, little endian) as pydicom read a file without meta -> its transfer syntax.
_SYNTAX_READ = {
    (True, True): pydicom.uid.ImplicitVRLittleEndian,
    (False, True): pydicom.uid.ExplicitVRLittleEndian,
    (False, False): pydicom.uid.ExplicitVRBigEndian,
}

# pydicom's settings and Python's warning filters are process-global; the lock keeps our
# temporary changes from interleaving when threads share this module (use processes to
# parallelise decoding: the lock serialises it).
_PYDICOM_LOCK = threading.RLock()


class BadInput(PneumoError):
    """A source file or row cannot be ingested; message = the reason (no patient data in it)."""


@dataclass(frozen=True)
class PatientIds:
    """The header values that can name a patient (``DICOM_PATIENT_ATTRIBUTES``, the empty
    ones left out), for keyed hashing only: never log or store them. Its repr names the
    attributes present, never a value, so a traceback or a log of an image shows none."""

    items: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, str]:
        return dict(self.items)

    def __repr__(self) -> str:
        return f"PatientIds({', '.join(k for k, _ in self.items)}; values hidden)"


@dataclass(frozen=True, kw_only=True)
class DicomImage:
    """One DICOM image as a shard stores it.

    Attributes:
        image_id: SOPInstanceUID, stripped; the file stem when it is missing or empty.
        image_bytes: the stored image: the untouched JPEG frame, or a PNG.
        image_format: ``"jpeg"`` or ``"png"``.
        rows, cols: image height and width in pixels.
        bit_depth: 8 or 16, the bit depth of the stored image.
        bits_stored: DICOM BitsStored (e.g. 8, 10, 15).
        transfer_syntax: the source transfer syntax UID.
        photometric: the source PhotometricInterpretation (the stored image is always
            MONOCHROME2-like: bone bright).
        patient_ids: the patient-naming header values (see :class:`PatientIds`).
        view_position: ``"PA"``, ``"AP"``, ... or None.
        sex: ``"M"``, ``"F"``, ``"O"`` or None.
        age_years: age in years, or None if missing, unparseable or over 120.
        pixel_spacing: (row, column) spacing in mm, or None if missing or zero.
    """

    image_id: str
    image_bytes: bytes
    image_format: str
    rows: int
    cols: int
    bit_depth: int
    bits_stored: int
    transfer_syntax: str
    photometric: str
    patient_ids: PatientIds = field(repr=False)
    view_position: str | None
    sex: str | None
    age_years: float | None
    pixel_spacing: tuple[float, float] | None

    @property
    def raw_patient_id(self) -> str | None:
        """The PatientID, for keyed hashing only; None when missing or empty."""
        return self.patient_ids.as_dict().get("PatientID")


@dataclass(frozen=True, kw_only=True)
class _Header:
    """The pixel-describing header fields, validated."""

    rows: int
    cols: int
    samples: int
    frames: int
    bits_stored: int
    signed: bool
    photometric: str
    transfer_syntax: UID

    @property
    def passthrough(self) -> bool:  # the SIIM case: store the JPEG frame as it is
        grey8 = (self.frames, self.samples, self.bits_stored, self.signed) == (1, 1, 8, False)
        return (
            grey8 and self.photometric == "MONOCHROME2" and self.transfer_syntax == JPEGBaseline8Bit
        )


def read_dicom(data: bytes, source: str) -> DicomImage:
    """Turn the bytes of one DICOM file into a :class:`DicomImage`.

    Signed pixel data (PixelRepresentation 1) is shifted to unsigned by subtracting the
    smallest value BitsStored can hold, so the PNG keeps every distinct value.

    Args:
        data: the whole file.
        source: where it came from (path or URL), for messages and as the fallback id.

    Raises:
        BadInput: empty, not DICOM, truncated, no pixel data, undecodable or inconsistent.
    """
    lean = _read_lean(data)
    if lean is not None:
        header, frame, values = lean
        return _image(values.get, header, source, frame, "jpeg", 8)
    ds, header = _parse(data)
    if header.passthrough:
        image_bytes, image_format, bit_depth = _jpeg_frame(ds, header), "jpeg", 8
    else:
        pixels = _decode(ds, header, source)
        image_bytes, image_format = _encode_png(pixels), "png"
        bit_depth = 8 if pixels.dtype == np.uint8 else 16
    with _quiet_pydicom():  # reading a value converts it: pydicom may warn
        return _image(ds.get, header, source, image_bytes, image_format, bit_depth)


def read_patient_ids(data: bytes, source: str) -> tuple[str, PatientIds]:
    """The image id and patient ids of a DICOM file, from its header alone (no pixels
    decoded): to know the patient of a listed image before the batch reads its files.

    Raises:
        BadInput: empty or not DICOM (a file :func:`read_dicom` would reject too).
    """
    lean = read_lean(data)
    if lean is not None:
        get: Callable[[str], Any] = lean.values.get
    else:
        force = _needs_force(data)
        with _quiet_pydicom():
            get = _read_dataset(data, force=force, header_only=True).get
    with _quiet_pydicom():
        return _text(get, "SOPInstanceUID") or PurePosixPath(source).stem, _patient_ids(get)


def decode_pixels(data: bytes, source: str) -> np.ndarray:
    """Decode a DICOM file to a 2-D uint8/uint16 array, bone bright (as MONOCHROME2).

    The array holds the same values :func:`read_dicom` stores (for a pass-through JPEG,
    what Pillow decodes from the stored frame).

    Raises:
        BadInput: as :func:`read_dicom`.
    """
    lean = _read_lean(data)
    if lean is not None:
        return _decode_jpeg(lean[1])
    ds, header = _parse(data)
    if header.passthrough:
        return _decode_jpeg(_jpeg_frame(ds, header))
    return _decode(ds, header, source)


def parse_age(text: object, *, max_years: float | None = MAX_AGE_YEARS) -> float | None:
    """Parse a DICOM Age String and its sloppy variants into years.

    Accepts ``"062Y"``, ``"62"`` (bare numbers, as in SIIM), ``"011M"``, ``"003W"``,
    ``"010D"``. Returns None when missing, unparseable, or above `max_years` (ages like
    414 in NIH's 2017 file are data errors); pass ``max_years=None`` to keep every value.
    """
    if text is None:
        return None
    match = _AGE.fullmatch(str(text).strip())
    if match is None:
        return None
    years = float(match[1]) * _YEARS_PER_UNIT[match[2].upper()]
    if max_years is not None and years > max_years:
        return None
    return years


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Keep pydicom from warning or logging about header values while we read.

    pydicom's validation messages quote the offending value (a PatientID could be one),
    and SIIM files trip them by design (SOPInstanceUID "ID_...", 19-character DS values).
    """
    with _PYDICOM_LOCK, warnings.catch_warnings(), pydicom_config.disable_value_validation():
        warnings.simplefilter("ignore")
        yield


def _parse(data: bytes) -> tuple[Dataset, _Header]:
    """Parse the dataset (pixel data included, not decoded) and validate its header."""
    force = _needs_force(data)
    with _quiet_pydicom():
        ds = _read_dataset(data, force=force)
        header = _header(ds)
    return ds, header


def _needs_force(data: bytes) -> bool:
    """Whether pydicom must be forced (no preamble); BadInput for what is not DICOM."""
    if not data:
        raise BadInput("file is empty")
    has_preamble = data[128:132] == b"DICM"
    # Without preamble (old ACR-NEMA style) a dataset starts with group 0x0002 or 0x0008,
    # little endian; checking that keeps force=True from "parsing" random bytes into junk.
    if not has_preamble and data[:2] not in (b"\x02\x00", b"\x08\x00"):
        raise BadInput("not a DICOM file (no DICM prefix, no recognisable first element)")
    return not has_preamble


def _read_dataset(data: bytes, *, force: bool, header_only: bool = False) -> Dataset:
    """dcmread with errors turned into BadInput; a cut-off file is reported as truncated."""
    try:
        # Strict reading so that a cut-off file raises EOFError: by default pydicom drops
        # the cut-off last element (the pixel data) with a warning, and we would report
        # "no pixel data" for what is really a truncated file.
        with pydicom_config.strict_reading():
            ds = pydicom.dcmread(BytesIO(data), force=force, stop_before_pixels=header_only)
    except EOFError as e:
        raise BadInput(f"truncated: {str(e).splitlines()[0][:160]}") from e
    except Exception:
        # Strict mode also rejects an unknown character set, a VR mismatch or an invalid
        # meta value, which a lenient read tolerates: try again without it.
        try:
            ds = pydicom.dcmread(BytesIO(data), force=force, stop_before_pixels=header_only)
        except Exception as e:  # pydicom raises many types (struct.error, ValueError, ...)
            raise BadInput(f"not a DICOM file ({type(e).__name__})") from e
    if "TransferSyntaxUID" not in ds.file_meta:  # no meta header: say how pydicom read it
        syntax = _SYNTAX_READ.get(ds.original_encoding)
        if syntax is None:
            raise BadInput("no transfer syntax, and the encoding cannot be told")
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _header(ds: Dataset) -> _Header:
    """Validate the pixel-describing fields before touching the pixel data."""
    if "PixelData" not in ds:
        raise BadInput("no pixel data (none in the file, or the file is cut off before it)")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols:
        raise BadInput(f"bad image size Rows={rows} Columns={cols}")
    bits_allocated = _int(ds, "BitsAllocated")
    if bits_allocated not in (1, 8, 16, 32):
        raise BadInput(f"unsupported BitsAllocated {bits_allocated}")
    bits_stored = _int(ds, "BitsStored") or bits_allocated
    if not 1 <= bits_stored <= min(bits_allocated, 16):
        raise BadInput(f"unsupported BitsStored {bits_stored} (BitsAllocated {bits_allocated})")
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    return _Header(
        rows=rows,
        cols=cols,
        samples=_int(ds, "SamplesPerPixel") or 1,
        frames=_int(ds, "NumberOfFrames") or 1,
        bits_stored=bits_stored,
        signed=_int(ds, "PixelRepresentation") == 1,
        photometric=photometric,
        transfer_syntax=ds.file_meta.TransferSyntaxUID,
    )


def _int(ds: Dataset, keyword: str) -> int:
    """An integer header value; 0 when missing or not a single integer."""
    try:
        return int(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def _jpeg_frame(ds: Dataset, header: _Header) -> bytes:
    """The single encapsulated JPEG frame, checked cheaply but not decoded."""
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, EOFError) as e:
        raise BadInput(f"corrupt encapsulated pixel data ({type(e).__name__})") from e
    return _checked_frame(frame, header)


def _checked_frame(frame: bytes, header: _Header) -> bytes:
    """The frame without its padding, if its markers and SOF agree with the header."""
    frame = strip_padding(frame)
    problem = frame_problem(frame, header.rows, header.cols)
    if problem is not None:
        raise BadInput(problem)
    return frame


def _read_lean(data: bytes) -> tuple[_Header, bytes, dict[str, Any]] | None:
    """The pass-through case read without pydicom (see ``pneumo.ingest.dicom_lean``), or None."""
    lean = read_lean(data)
    if lean is None:
        return None
    header = _Header(
        rows=lean.rows,
        cols=lean.cols,
        samples=1,
        frames=1,
        bits_stored=8,
        signed=False,
        photometric="MONOCHROME2",
        transfer_syntax=JPEGBaseline8Bit,
    )
    return header, lean.frame, lean.values


def _decode_jpeg(frame: bytes) -> np.ndarray:
    """Decode a pass-through JPEG frame with Pillow (the decoder pydicom uses too)."""
    try:
        with Image.open(BytesIO(frame)) as image:
            # np.array, not asarray: the caller gets a writable array of its own.
            pixels = np.array(image.convert("L") if image.mode != "L" else image)
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for broken streams
        raise BadInput(f"cannot decode JPEG frame ({type(e).__name__})") from e
    return pixels


def _decode(ds: Dataset, header: _Header, source: str) -> np.ndarray:
    """Decode the first frame with pydicom and bring it to unsigned, bone-bright, 2-D."""
    syntax = header.transfer_syntax
    try:
        with _quiet_pydicom():
            pixels = pixel_array(ds, index=0)
    except Exception as e:  # plugins raise RuntimeError, NotImplementedError, OSError, ...
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise BadInput(f"cannot decode transfer syntax {syntax} ({syntax.name}): {reason}") from e
    if pixels.ndim == 3:
        log.info("%s: %s image, keeping the first channel", source, header.photometric)
        pixels = pixels[..., 0]
    if pixels.shape != (header.rows, header.cols):
        raise BadInput(f"decoded {pixels.shape}, header says {header.rows}x{header.cols}")
    return _to_monochrome2(pixels, header)


def _to_monochrome2(pixels: np.ndarray, header: _Header) -> np.ndarray:
    """Unsigned values within BitsStored, bone bright; uint8 or uint16."""
    top = 2**header.bits_stored - 1
    values = pixels.astype(np.int64)
    if header.signed:
        values += 2 ** (header.bits_stored - 1)
    np.clip(values, 0, top, out=values)
    if header.photometric == "MONOCHROME1":
        values = top - values
    return values.astype(np.uint8 if header.bits_stored <= 8 else np.uint16)


def _encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG, 8-bit grey (L) or 16-bit grey (I;16), no metadata chunks."""
    out = BytesIO()
    # Pillow maps uint8 to mode L and uint16 to I;16, which PNG stores as 16-bit grey.
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
    return out.getvalue()


def _image(
    get: Callable[[str], Any],
    header: _Header,
    source: str,
    image_bytes: bytes,
    image_format: str,
    depth: int,
) -> DicomImage:
    """Assemble the DicomImage; ``get(keyword)`` reads a header value (pydicom's
    ``Dataset.get`` or the lean reader's values); the non-pixel fields are parsed tolerantly."""
    return DicomImage(
        image_id=_text(get, "SOPInstanceUID") or PurePosixPath(source).stem,
        image_bytes=image_bytes,
        image_format=image_format,
        rows=header.rows,
        cols=header.cols,
        bit_depth=depth,
        bits_stored=header.bits_stored,
        transfer_syntax=str(header.transfer_syntax),
        photometric=header.photometric,
        patient_ids=_patient_ids(get),
        view_position=(_text(get, "ViewPosition") or "").upper() or None,
        sex=_SEX.get((_text(get, "PatientSex") or "").upper()),
        age_years=parse_age(_text(get, "PatientAge")),
        pixel_spacing=_pixel_spacing(get),
    )


def _text(get: Callable[[str], Any], keyword: str) -> str | None:
    """A header string, stripped; None when missing or empty."""
    try:
        value = get(keyword)
    except Exception:  # a malformed optional element should not sink the image
        return None
    text = str(value).strip() if value is not None else ""
    return text or None


def _patient_ids(get: Callable[[str], Any]) -> PatientIds:
    """The patient-naming values present; a multi-valued one (OtherPatientIDs) joined with
    ``\\`` as the file writes it (the lean reader declines such files)."""
    items = []
    for keyword in DICOM_PATIENT_ATTRIBUTES:
        try:
            value = get(keyword)
        except Exception:  # a malformed optional element should not sink the image
            continue
        if isinstance(value, (list, tuple, MultiValue)):
            text = "\\".join(str(v).strip() for v in value).strip("\\ ")
        else:
            text = str(value).strip() if value is not None else ""
        if text:
            items.append((keyword, text))
    return PatientIds(tuple(items))


def _pixel_spacing(get: Callable[[str], Any]) -> tuple[float, float] | None:
    """(row, column) spacing in mm; None when missing, malformed or zero (RG1 has 0\\0)."""
    try:
        row, col = (float(v) for v in get("PixelSpacing") or ())
    except (TypeError, ValueError):  # missing, one value, three values, not numbers
        return None
    if not (row > 0 and col > 0):
        return None
    return row, col
