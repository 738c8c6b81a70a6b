"""16-bit images in a dataset, read by webdataset's own standard decoders and by pneumo.

webdataset's image decoders (``l8``, ``rgb8``, ``pil``, ``torch``, ...) open every image
extension with Pillow and convert it to 8 bits, clipping a 16-bit PNG to solid white. So a
16-bit image is stored as ``KEY.npy.gz``, which webdataset's default handlers turn into
the exact uint16 array whatever decoder a reader names (``pneumo.shards.members``).

Real files: the two 16-bit chest DICOMs of the robustness corpus (RG1: JPEG 2000,
MONOCHROME1, 15 bits stored, values 6255-31964 once inverted; CR-MONO1-10: uncompressed,
no preamble, 10 bits) and one 8-bit SIIM DICOM (its JPEG frame stored as it is), through
``ingest_siim``. What webdataset gives is compared with pydicom's own decode of the source
after pneumo's documented photometric handling (MONOCHROME1 inverted as
``(2**BitsStored - 1) - x``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
import webdataset as wds
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import ImplicitVRLittleEndian

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.nih import NihConfig, ingest_nih
from pneumo.ingest.patients import Patient
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.ingest.units import Rejected, Sample, stored_form
from pneumo.shards import layout, manifest, stream
from pneumo.shards.members import IMAGE_SUFFIXES, decode_array, encode_array
from pneumo.shards.store import open_store
from pneumo.training import decode

SIIM_8_BIT = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
SIXTEEN = ("RG1_J2KI.dcm", "CR-MONO1-10-chest.dcm")
STANDARD_DECODERS = ("l8", "rgb8", "pil", "torch")
SIZE = 64


def _source(path: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # CR-MONO1 has no file meta at all
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def _expected(path: Path) -> tuple[str, np.ndarray]:
    """The sample key and the values pneumo documents for the file: pydicom's decode,
    MONOCHROME1 inverted within BitsStored."""
    ds = _source(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = ds.pixel_array.astype(np.int64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = (2 ** int(ds.BitsStored) - 1) - values
    return layout.sample_key(str(ds.SOPInstanceUID)), values


def _shards(dataset: Path) -> list[str]:
    return [str(p) for p in sorted(dataset.glob("shards/**/*.tar"))]


def _members(dataset: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in _shards(dataset):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, suffix = m.name.partition(".")
                out.setdefault(key, {})[suffix] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return out


def _webdataset(dataset: Path, decoder: str | None) -> dict[str, dict]:
    """Every sample of the dataset's shards, read the way webdataset's README reads them."""
    reader = wds.WebDataset(_shards(dataset), shardshuffle=False)
    reader = reader.decode(decoder) if decoder else reader.decode()
    return {sample["__key__"]: sample for sample in reader}


def _png16(values: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", values.astype(np.uint16))
    assert ok
    return png.tobytes()


@pytest.fixture(scope="module")
def sources(shared_data: Path) -> dict[str, Path]:
    """The three DICOMs by file name (skips without the full sample set)."""
    paths = [shared_data / "robustness" / name for name in SIXTEEN]
    paths.append(shared_data / "siim" / "dicom_train" / f"{SIIM_8_BIT}.dcm")
    return {p.name: p for p in paths}


@pytest.fixture(scope="module")
def dataset(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sixteen")
    (root / "in").mkdir()
    for name, path in sources.items():
        shutil.copy(path, root / "in" / name)
    out = root / "ds"
    summary = ingest_siim(SiimConfig(dicom_root=str(root / "in"), batch=BatchConfig(out=str(out))))
    assert summary.committed and summary.ingested == 3 and summary.quarantined == 0
    return out


@pytest.fixture(scope="module")
def expected(sources: dict[str, Path]) -> dict[str, np.ndarray]:
    """Sample key -> the 16-bit values, for the two 16-bit files."""
    return dict(_expected(sources[name]) for name in SIXTEEN)


# ---------------------------------------------------------------- webdataset, as a user reads it


@pytest.mark.parametrize("decoder", STANDARD_DECODERS)
def test_webdataset_standard_decoders_give_the_stored_16_bit_values(dataset, expected, decoder):
    samples = _webdataset(dataset, decoder)
    assert set(expected) < set(samples)
    for key, values in expected.items():
        sample = samples[key]
        # no member that an image decoder would squeeze into 8 bits
        assert not set(sample) & {"png", "jpg", "tif", "tiff", "pgm", "jp2"}
        pixels = sample["npy.gz"]
        assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint16
        np.testing.assert_array_equal(pixels, values)
        assert (pixels == pixels.max()).mean() < 0.01  # not white
        assert len(np.unique(pixels)) > 256  # not 8 bits either
        assert sample["json"]["bit_depth"] == 16 and sample["json"]["image_format"] == "npy"


def test_the_rg1_image_is_the_one_that_came_out_white(dataset, expected, sources):
    """The image of the report: values 6255-31964, all 255 through the old KEY.png."""
    key, values = _expected(sources["RG1_J2KI.dcm"])
    assert (values.min(), values.max()) == (6255, 31964)
    legacy = wds.autodecode.ImageHandler("l8")(".png", _png16(values))
    assert (legacy == 255).all()  # what a 16-bit KEY.png gives: the garbage this prevents
    np.testing.assert_array_equal(_webdataset(dataset, "l8")[key]["npy.gz"], values)


@pytest.mark.parametrize("decoder", STANDARD_DECODERS)
def test_an_8_bit_jpeg_sample_decodes_as_before(dataset, sources, decoder):
    key = layout.sample_key(SIIM_8_BIT)
    frame = next(
        generate_frames(_source(sources[f"{SIIM_8_BIT}.dcm"]).PixelData, number_of_frames=1)
    )
    grey = np.asarray(Image.open(io.BytesIO(frame.rstrip(b"\x00"))).convert("L"))
    got = _webdataset(dataset, decoder)[key]
    assert "npy.gz" not in got
    image = got["jpg"]
    if decoder == "l8":
        np.testing.assert_array_equal(image, grey)
    elif decoder == "rgb8":
        assert image.shape == (*grey.shape, 3)
        for channel in range(3):
            np.testing.assert_array_equal(image[..., channel], grey)
    elif decoder == "pil":
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image)[..., 0], grey)
    else:
        assert isinstance(image, torch.Tensor) and image.shape == (3, *grey.shape)
        np.testing.assert_allclose(image[0].numpy(), grey / np.float32(255), rtol=0, atol=1e-6)


def test_a_plain_decode_and_numpy_alone_read_the_member_too(dataset, expected):
    """Without webdataset's decoders: gzip and numpy, nothing of pneumo's."""
    members = _members(dataset)
    samples = _webdataset(dataset, None)  # webdataset's default handlers only
    for key, values in expected.items():
        np.testing.assert_array_equal(samples[key]["npy.gz"], values)
        raw = np.load(io.BytesIO(gzip.decompress(members[key]["npy.gz"])), allow_pickle=False)
        np.testing.assert_array_equal(raw, values)


def test_a_16_bit_png_of_an_older_dataset_reads_right_with_the_documented_handler(
    expected, tmp_path
):
    """Datasets written before keep 16-bit KEY.png members: the README's recipe for them."""
    values = next(iter(expected.values()))
    shard = tmp_path / "old.tar"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, blob in (("k.json", b"{}"), ("k.png", _png16(values))):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

    def png_any_depth(data: bytes) -> np.ndarray:  # as the README writes it
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)

    reader = wds.WebDataset(str(shard), shardshuffle=False)
    (sample,) = reader.decode(wds.handle_extension("png", png_any_depth), "l8")
    np.testing.assert_array_equal(sample["png"], values)


# ---------------------------------------------------------------- the manifest and the stream


def test_the_manifest_names_and_hashes_the_one_image_member(dataset, expected):
    rows = {r["key"]: r for r in manifest.read(open_store(dataset)).to_pylist()}
    members = _members(dataset)
    assert set(rows) == set(members)
    for key, row in rows.items():
        images = [s for s in members[key] if s in IMAGE_SUFFIXES]
        sixteen = key in expected
        assert images == (["npy.gz"] if sixteen else ["jpg"])
        assert (row["image_format"], row["bit_depth"]) == (("npy", 16) if sixteen else ("jpeg", 8))
        assert row["content_sha256"] == hashlib.sha256(members[key][images[0]]).hexdigest()
        assert (row["rows"], row["cols"]) == (expected[key].shape if sixteen else (1024, 1024))


def test_pneumo_decodes_the_16_bit_member_at_full_precision(dataset, expected):
    """The loader gives exactly what it gives for the same values in a 16-bit PNG (the
    datasets written before): windowed floats, not 8-bit steps."""
    members = _members(dataset)
    for key, values in expected.items():
        image, mask = decode.decode_sample({"__key__": key, **members[key]}, SIZE)
        legacy, _ = decode.decode_sample({"__key__": key, "png": _png16(values)}, SIZE)
        assert image.dtype == np.float32 and not mask.any()
        np.testing.assert_array_equal(image, legacy)
        assert len(np.unique(image)) > 256
        _, orig = decode.decode_image(members[key]["npy.gz"], "npy.gz", SIZE)
        assert orig == values.shape


def test_the_checked_stream_reads_16_bit_samples(dataset, expected):
    store = open_store(dataset)
    entries = stream.entries_from_table(manifest.read(store))
    by_shard: dict[str, dict] = {}
    for entry in entries:
        by_shard.setdefault(entry.shard, {})[entry.key] = entry
    seen = set()
    for shard, wanted in by_shard.items():
        for sample in stream.read_shard(store, shard, wanted):
            decode.decode_sample(sample, SIZE)
            seen.add(sample["__key__"])
    assert seen >= set(expected)


# ---------------------------------------------------------------- other sources, the member itself


def test_a_16_bit_nih_png_is_stored_as_its_values(shared_data, tmp_path):
    """No real 16-bit chest PNG is at hand: a real NIH PNG widened to 12 of 16 bits."""
    grey = cv2.imread(
        str(shared_data / "nih" / "images" / "00000001_000.png"), cv2.IMREAD_GRAYSCALE
    )
    values = grey.astype(np.uint16) * 16 + 100
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000001_000.png").write_bytes(_png16(values))
    cfg = NihConfig(
        image_root=str(tmp_path / "in"),
        labels=shared_data / "nih" / "Data_Entry_2017.csv.gz",
        batch=BatchConfig(out=str(tmp_path / "ds")),
    )
    assert ingest_nih(cfg).ingested == 1
    (sample,) = _webdataset(tmp_path / "ds", "l8").values()
    assert "png" not in sample
    np.testing.assert_array_equal(sample["npy.gz"], values)


def _sample(members: dict[str, bytes], depth: int) -> Sample:
    return Sample(
        key="k",
        image_id="k",
        members=members,
        meta={"bit_depth": depth, "image_format": "png", "content_sha256": "x"},
        patient=Patient("test", "k", "image"),
    )


def test_8_bit_images_are_kept_and_a_broken_16_bit_png_is_rejected():
    eight = _sample({"png": cv2.imencode(".png", np.arange(12, dtype=np.uint8))[1].tobytes()}, 8)
    assert stored_form(eight) is eight
    broken = stored_form(_sample({"png": _png16(np.arange(12).reshape(3, 4))[:40]}, 16))
    assert isinstance(broken, Rejected) and "16-bit PNG" in broken.reason


def test_the_member_round_trips_every_value_with_stable_bytes():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**16, size=(37, 53), dtype=np.uint16)
    values[0, :3] = (0, 1, 65535)
    member = encode_array(values)
    assert member == encode_array(values.astype(">u2"))  # byte order does not matter
    assert member[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no time, no name
    np.testing.assert_array_equal(decode_array(member), values)
    assert decode_array(member).dtype == np.uint16
    damaged = bytearray(member)
    damaged[len(member) // 2] ^= 0xFF
    with pytest.raises(ValueError):
        decode_array(bytes(damaged))
    with pytest.raises(ValueError):
        encode_array(values.astype(np.int32))
    with pytest.raises(ValueError):
        decode_array(gzip.compress(b"not an array"))
    npy = io.BytesIO()
    np.save(npy, np.zeros((2, 3, 4), np.uint16))
    with pytest.raises(ValueError):
        decode_array(gzip.compress(npy.getvalue()))
