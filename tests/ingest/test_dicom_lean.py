"""The lean DICOM reader against pydicom: the same DicomImage on every real file and on the
header variants no real file shows; the lean reader declines what it does not handle."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import sample_data
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

import pneumo.ingest.dicom as dicom
from pneumo.ingest.dicom import DicomImage, decode_pixels, read_dicom
from pneumo.ingest.dicom_lean import read_lean

DATA = Path(sample_data.root())  # the full set, or tests/data in a fresh clone
REAL_FILES = sorted(DATA.rglob("*.dcm"))
SIIM_6904 = (
    DATA / "siim" / "dicom_train" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
)


def _by_pydicom(data: bytes, source: str, monkeypatch: pytest.MonkeyPatch) -> DicomImage:
    with monkeypatch.context() as m:
        m.setattr(dicom, "read_lean", lambda data: None)  # the lean reader declines all
        return read_dicom(data, source)


def test_every_real_siim_file_takes_the_lean_path() -> None:
    taken = {p.name for p in REAL_FILES if read_lean(p.read_bytes()) is not None}
    siim = {p.name for p in REAL_FILES if p.parts[-3] == "siim"}
    assert len(siim) == 21 and taken == siim  # the two odd chest DICOMs go to pydicom


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.stem[-12:])
def test_both_paths_give_the_same_image_on_real_files(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = path.read_bytes()
    lean, full = read_dicom(data, str(path)), _by_pydicom(data, str(path), monkeypatch)
    # Every field the shards and manifest use, and the frame bytes.
    assert vars(lean) == vars(full)


def test_the_lean_path_does_not_need_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pydicom was asked to parse a SIIM file")

    monkeypatch.setattr(pydicom, "dcmread", refuse)
    image = read_dicom(SIIM_6904.read_bytes(), str(SIIM_6904))
    assert image.image_format == "jpeg" and image.image_id == SIIM_6904.stem
    assert decode_pixels(SIIM_6904.read_bytes(), "x.dcm").shape == (1024, 1024)


def _siim() -> Dataset:
    return pydicom.dcmread(SIIM_6904)


def _frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _save(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def _raw(tag: int, vr: str, value: bytes) -> Callable[[Dataset], None]:
    """Write the value bytes as given (pydicom would otherwise convert and normalise them)."""

    def change(ds: Dataset) -> None:
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)

    return change


def _fragments(ds: Dataset) -> None:
    frame = _frame(ds)
    ds.PixelData = encapsulate([frame], fragments_per_frame=3)  # one frame in 3 fragments


def _offset_table(ds: Dataset) -> None:
    ds.PixelData = encapsulate([_frame(ds)], has_bot=True)


def _sequence(undefined_length: bool) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        item = Dataset()
        item.CodeValue = "T-D3000"
        ds.AnatomicRegionSequence = [item]
        ds["AnatomicRegionSequence"].is_undefined_length = undefined_length

    return change


def _delete(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def _implicit(ds: Dataset) -> None:  # the same image, uncompressed, implicit VR
    pixels = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.PixelData = pixels.tobytes()


# name -> (change to the real file, does the lean reader take it?)
VARIANTS: dict[str, tuple[Callable[[Dataset], None], bool]] = {
    "as is": (lambda ds: None, True),
    "3 fragments": (_fragments, True),
    "offset table": (_offset_table, True),
    "NumberOfFrames 1": (_set("NumberOfFrames", 1), True),
    "NUL-padded CS": (_raw(0x00185101, "CS", b"AP\0 "), True),
    "lower-case sex": (_raw(0x00100040, "CS", b"f "), True),
    "age with unit": (_raw(0x00101010, "AS", b"011M"), True),
    "no age": (_delete("PatientAge"), True),
    "empty age": (_raw(0x00101010, "AS", b""), True),
    "no pixel spacing": (_delete("PixelSpacing"), True),
    "spaced spacing": (_raw(0x00280030, "DS", b" 0.2\\0.3 "), True),
    "one spacing": (_raw(0x00280030, "DS", b"0.2 "), True),
    "three spacings": (_raw(0x00280030, "DS", b"1\\2\\3 "), True),
    "bad spacing": (_raw(0x00280030, "DS", b"abc\\1 "), True),
    "zero spacing": (_raw(0x00280030, "DS", b"0\\0 "), True),
    "empty patient id": (_raw(0x00100020, "LO", b""), True),
    "no SOPInstanceUID": (_delete("SOPInstanceUID"), True),
    "two patient ids": (_raw(0x00100020, "LO", b"a\\b "), False),
    "latin-1 patient id": (_raw(0x00100020, "LO", "Jos\xe9".encode("latin-1")), False),
    "sequence": (_sequence(undefined_length=False), True),  # skipped by its length
    "open sequence": (_sequence(undefined_length=True), False),
    "NumberOfFrames 2": (_set("NumberOfFrames", 2), False),
    "MONOCHROME1": (_set("PhotometricInterpretation", "MONOCHROME1"), False),
    "implicit VR": (_implicit, False),
    "no photometric": (_delete("PhotometricInterpretation"), False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_both_paths_agree_on_header_variants(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    change, lean_takes_it = VARIANTS[name]
    ds = _siim()
    change(ds)
    data = _save(ds)
    assert (read_lean(data) is not None) == lean_takes_it
    assert vars(read_dicom(data, "v.dcm")) == vars(_by_pydicom(data, "v.dcm", monkeypatch))


def test_declining_is_not_judging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes after the pixel data, a short file: the lean reader declines, pydicom decides."""
    data = SIIM_6904.read_bytes()
    assert read_lean(data + b"\0\0\0\0") is None
    assert read_lean(data[:-20]) is None and read_lean(data[:300]) is None
    assert read_lean(data[:128] + b"DICX" + data[132:]) is None
    assert read_lean(b"") is None
