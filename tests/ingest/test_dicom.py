"""read_dicom / decode_pixels on the 21 real SIIM files, two odd real chest DICOMs, and breakage."""

from __future__ import annotations

import logging
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sample_data
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    generate_uid,
)

from pneumo.ingest.dicom import BadInput, DicomImage, decode_pixels, parse_age, read_dicom

# The full sample set, or the part of it in tests/data (tests/sample_data.py).
DATA = sample_data.root()
SIIM_FILES = sorted((DATA / "siim").glob("*/*.dcm"))
STAGE2_FILES = sorted((DATA / "siim" / "stage2_test").glob("*.dcm"))
SIIM_6904 = (
    DATA / "siim" / "dicom_train" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
)
RG1 = DATA / "robustness" / "RG1_J2KI.dcm"
CR_MONO1 = DATA / "robustness" / "CR-MONO1-10-chest.dcm"


def _dataset(path: Path) -> Dataset:
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def _pixel_array(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _dataset(path).pixel_array


def _frame(path: Path) -> bytes:
    return next(generate_frames(_dataset(path).PixelData, number_of_frames=1))


def _to_bytes(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def _png(image: DicomImage) -> np.ndarray:
    with Image.open(BytesIO(image.image_bytes)) as png:
        assert png.format == "PNG"
        return np.array(png)


def test_all_real_siim_files_are_here() -> None:
    assert len(SIIM_FILES) == 21 and len(STAGE2_FILES) == 10


@pytest.mark.parametrize("path", SIIM_FILES, ids=lambda p: p.stem[-12:])
def test_siim_file_keeps_its_jpeg_frame(path: Path) -> None:
    data = path.read_bytes()
    image = read_dicom(data, str(path))
    frame = _frame(path)
    assert image.image_format == "jpeg"
    # Byte for byte the encapsulated frame, without the even-length padding byte.
    assert frame.startswith(image.image_bytes) and frame[len(image.image_bytes) :] in (b"", b"\0")
    assert image.image_bytes.endswith(b"\xff\xd9")
    assert (image.rows, image.cols, image.bit_depth, image.bits_stored) == (1024, 1024, 8, 8)
    assert image.transfer_syntax == JPEGBaseline8Bit == "1.2.840.10008.1.2.4.50"
    assert image.photometric == "MONOCHROME2"
    with Image.open(BytesIO(image.image_bytes)) as jpeg:
        decoded = np.asarray(jpeg)
    reference = _pixel_array(path)
    assert decoded.shape == reference.shape == (1024, 1024)
    assert np.abs(decoded.astype(int) - reference).max() <= 1  # decoders differ by +-1
    assert np.array_equal(decode_pixels(data, str(path)), decoded)


@pytest.mark.parametrize("path", SIIM_FILES, ids=lambda p: p.stem[-12:])
def test_siim_header_fields(path: Path) -> None:
    ds = _dataset(path)
    image = read_dicom(path.read_bytes(), str(path))
    assert image.age_years == float(ds.PatientAge)  # bare numbers like "62"
    assert image.sex == ds.PatientSex and image.sex in ("M", "F")
    assert image.view_position == ds.ViewPosition and image.view_position in ("PA", "AP")
    spacing = [float(v) for v in ds.PixelSpacing]
    assert image.pixel_spacing == (spacing[0], spacing[1])
    if path in STAGE2_FILES:
        assert image.image_id == path.stem and image.image_id.startswith("ID_")
        assert image.raw_patient_id is None  # empty PatientID
    else:
        assert image.image_id == path.stem == ds.SOPInstanceUID
        assert image.raw_patient_id == ds.PatientID


def test_long_pixel_spacing_strings_are_read_as_written() -> None:
    # 19 characters, over DS's 16: kept as the float the file writes (a pandas artefact).
    path = next(p for p in SIIM_FILES if b"0.14300000000000002" in p.read_bytes())
    spacing = read_dicom(path.read_bytes(), str(path)).pixel_spacing
    assert spacing == (0.14300000000000002, 0.14300000000000002)


def test_reading_is_silent_and_keeps_patient_data_out(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    for path in [*SIIM_FILES, RG1, CR_MONO1]:
        ds = _dataset(path)
        secrets = [str(ds.get(k) or "") for k in ("PatientID", "PatientName", "PatientBirthDate")]
        secrets += [str(ds.get("InstitutionName") or "")]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom's invalid UI / DS warnings would raise
            image = read_dicom(path.read_bytes(), str(path))
        others = {
            k: v for k, v in vars(image).items() if k not in ("raw_patient_id", "image_bytes")
        }
        for secret in filter(None, secrets):
            assert secret not in repr(others)
            assert secret not in caplog.text
    assert "ID_" not in caplog.text  # pydicom's "Invalid value for VR UI" quotes values


def test_jpeg2000_monochrome1_becomes_inverted_16bit_png() -> None:
    data = RG1.read_bytes()
    image = read_dicom(data, str(RG1))
    assert (image.image_format, image.bit_depth, image.bits_stored) == ("png", 16, 15)
    assert (image.rows, image.cols) == (1955, 1841)
    assert image.photometric == "MONOCHROME1"
    assert image.transfer_syntax == "1.2.840.10008.1.2.4.91"
    assert image.pixel_spacing is None  # 0.000\0.000
    assert (image.age_years, image.sex, image.view_position) == (None, "F", "PA")
    with Image.open(BytesIO(image.image_bytes)) as png:
        assert png.mode == "I;16"
    stored = _png(image)
    assert stored.dtype == np.uint16
    assert np.array_equal(stored, (2**15 - 1) - _pixel_array(RG1).astype(np.int64))
    assert np.array_equal(decode_pixels(data, str(RG1)), stored)


def test_file_without_preamble_or_meta_is_read_as_implicit_little_endian() -> None:
    data = CR_MONO1.read_bytes()
    assert data[128:132] != b"DICM"
    image = read_dicom(data, str(CR_MONO1))
    assert image.transfer_syntax == ImplicitVRLittleEndian
    assert (image.image_format, image.bit_depth, image.bits_stored) == ("png", 16, 10)
    assert (image.rows, image.cols, image.view_position) == (440, 440, "PA")
    assert image.image_id == "1.2.392.200036.9125.0.19950720112207"
    stored = _png(image)
    assert np.array_equal(stored, 1023 - _pixel_array(CR_MONO1).astype(np.int64))
    assert stored.max() == 1023 - 0 and stored.min() == 1023 - 979


def test_monochrome1_jpeg_baseline_is_decoded_and_inverted() -> None:
    ds = _dataset(SIIM_6904)
    ds.PhotometricInterpretation = "MONOCHROME1"
    image = read_dicom(_to_bytes(ds), "m1.dcm")
    assert (image.image_format, image.bit_depth, image.photometric) == ("png", 8, "MONOCHROME1")
    with Image.open(BytesIO(_frame(SIIM_6904))) as jpeg:
        original = np.asarray(jpeg).astype(np.int64)
    assert np.array_equal(_png(image), 255 - original)


def _native(pixels: np.ndarray, **header: object) -> Dataset:
    """A small uncompressed dataset: no real file shows signed, colour or multi-frame data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if pixels.ndim == 4 else pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(pixels.dtype.kind == "i")
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    return ds


def test_signed_pixels_are_shifted_to_unsigned() -> None:
    pixels = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    ds = _native(pixels, BitsStored=12, HighBit=11)
    image = read_dicom(_to_bytes(ds), "signed.dcm")
    assert (image.bit_depth, image.bits_stored) == (16, 12)
    assert _png(image).tolist() == [[0, 2047, 2048, 4095]]


def test_colour_and_multiframe_keep_the_first_channel_and_frame() -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1] = 7, 99
    ds = _native(rgb, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    ds.Rows, ds.Columns = 2, 3
    assert np.array_equal(decode_pixels(_to_bytes(ds), "rgb.dcm"), np.full((2, 3), 7))
    frames = np.stack([np.full((2, 3), 5), np.full((2, 3), 6)]).astype(np.uint8)
    ds = _native(frames, NumberOfFrames=2)
    ds.Rows, ds.Columns = 2, 3
    image = read_dicom(_to_bytes(ds), "multi.dcm")
    assert image.bit_depth == 8 and np.array_equal(_png(image), np.full((2, 3), 5))


def test_missing_sop_instance_uid_falls_back_to_the_file_stem() -> None:
    ds = _native(np.zeros((2, 2), dtype=np.uint8))
    del ds.SOPInstanceUID
    assert read_dicom(_to_bytes(ds), "s3://bucket/some/dir/abc.def.dcm").image_id == "abc.def"


def _variant(change) -> bytes:
    ds = _dataset(SIIM_6904)
    change(ds)
    return _to_bytes(ds)


def _set(keyword: str, value: object):
    return lambda ds: setattr(ds, keyword, value)


def _truncate_frame(ds: Dataset) -> None:
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])


def _swap_syntax(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless


BAD_INPUTS = {
    "empty": (lambda: b"", "file is empty"),
    "random": (lambda: np.random.default_rng(0).bytes(4096), "not a DICOM file"),
    "half": (lambda: SIIM_6904.read_bytes()[: SIIM_6904.stat().st_size // 2], "truncated"),
    "no pixel data": (lambda: _variant(lambda ds: delattr(ds, "PixelData")), "no pixel data"),
    "jpeg-ls": (
        lambda: _variant(_swap_syntax),
        r"cannot decode transfer syntax 1\.2\.840\.10008\.1\.2\.4\.80",
    ),
    "frame cut": (lambda: _variant(_truncate_frame), r"truncated \(no EOI marker\)"),
    "wrong rows": (lambda: _variant(_set("Rows", 512)), "JPEG frame is 1024x1024"),
    "zero columns": (lambda: _variant(_set("Columns", 0)), "bad image size"),
    "bits": (lambda: _variant(_set("BitsAllocated", 12)), "unsupported BitsAllocated"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_say_why_without_patient_data(name: str) -> None:
    make, reason = BAD_INPUTS[name]
    data = make()
    for reader in (read_dicom, decode_pixels):
        with pytest.raises(BadInput, match=reason) as caught:
            reader(data, "bad.dcm")
        assert "16d7f894-55d7-4d95-8957-d18987f0e981" not in str(caught.value)  # PatientID/Name


def test_the_real_patient_id_is_what_the_variants_carry() -> None:
    # Guards the privacy assertion above: the string it looks for is really in the file.
    assert _dataset(SIIM_6904).PatientID == "16d7f894-55d7-4d95-8957-d18987f0e981"


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("62", 62.0),
        ("062Y", 62.0),
        (" 062Y ", 62.0),
        ("011M", 11 / 12),
        ("003W", 3 * 7 / 365),
        ("010D", 10 / 365),
        ("", None),
        (None, None),
        ("abc", None),
        ("62 years", None),
        ("414Y", None),
    ],
)
def test_parse_age(text: str | None, years: float | None) -> None:
    assert parse_age(text) == years


def test_parse_age_can_keep_impossible_values() -> None:
    assert parse_age("414Y", max_years=None) == 414.0
