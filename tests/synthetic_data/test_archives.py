"""The synthetic demo archives: exact SIIM / NIH on-disk formats, masks, determinism."""

from __future__ import annotations

import gzip
import io
import re
import uuid
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from pneumo.ingest.labels import read_nih_xref
from pneumo.ingest.rle import combine_masks, rle_decode
from pneumo.shards.errors import ConfigError
from pneumo.synthetic.archives import (
    NIH_FINDINGS,
    DemoPair,
    DemoSummary,
    write_demo_pair,
    write_nih_demo,
    write_siim_demo,
)
from pneumo.synthetic.chest import synth_chest

SEED, N, SIZE = 3, 6, 256


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _siim_rows(summary: DemoSummary) -> dict[str, list[str]]:
    """ImageId -> its EncodedPixels values, in file order (dicts keep insertion order)."""
    rows: dict[str, list[str]] = {}
    for line in summary.labels_csv.read_text().splitlines()[1:]:
        image_id, rle = line.split(",")
        rows.setdefault(image_id, []).append(rle)
    return rows


@pytest.fixture(scope="module")
def siim(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    return write_siim_demo(tmp_path_factory.mktemp("siim"), n=N, seed=SEED, size=SIZE)


@pytest.fixture(scope="module")
def nih(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    return write_nih_demo(tmp_path_factory.mktemp("nih"), n=N, seed=SEED, size=SIZE)


# ---------------------------------------------------------------- SIIM


def test_siim_dicoms_have_the_siim_format(siim: DemoSummary) -> None:
    paths = sorted(siim.image_root.rglob("*.dcm"))
    assert len(paths) == siim.n_images == N
    for path in paths:
        raw = path.read_bytes()
        assert raw[:128] == bytes(128) and raw[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        study, series = path.parent.parent.name, path.parent.name
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study, series)
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        assert re.fullmatch(r"1\.2\.276\.0\.7230010\.3\.1\.4\.8323329\.\d+\.\d+\.\d+", path.stem)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert (ds.Modality, ds.BodyPartExamined, ds.StudyDate) == ("CR", "CHEST", "19010101")
        assert (ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel) == (8, 8, 1)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert ds.PatientID == str(ds.PatientName) == str(uuid.UUID(ds.PatientID))
        assert re.fullmatch(r"\d{1,2}", ds.PatientAge)  # bare number, as in SIIM
        assert ds.ViewPosition in ("PA", "AP") and ds.PatientSex in ("M", "F")
        assert ds.LossyImageCompression == "01" and len(ds.PixelSpacing) == 2
        assert ds["PixelData"].is_undefined_length
        assert ds.pixel_array.shape == (SIZE, SIZE) and ds.pixel_array.dtype == np.uint8


def test_siim_frame_is_a_baseline_jpeg_that_round_trips(siim: DemoSummary) -> None:
    for path in siim.image_root.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        assert frame[:4] == b"\xff\xd8\xff\xdb"  # SOI then DQT: no JFIF segment, as in SIIM
        assert frame.rstrip(b"\x00").endswith(b"\xff\xd9") and len(frame) % 2 == 0
        assert b"\xff\xc0" in frame and b"\xff\xc2" not in frame  # baseline, not progressive
        with Image.open(io.BytesIO(frame)) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "L", (SIZE, SIZE))
            decoded = np.asarray(im)
        # JPEG decoders may differ by 1 (Pillow vs libjpeg): pydicom may pick either.
        assert np.abs(ds.pixel_array.astype(np.int16) - decoded).max() <= 1


def test_siim_csv_is_stage_1_style(siim: DemoSummary) -> None:
    raw = siim.labels_csv.read_bytes()
    assert raw.startswith(b"ImageId, EncodedPixels\n") and raw.endswith(b"\n")
    assert b"\r" not in raw
    lines = raw.decode().splitlines()[1:]
    assert all(re.fullmatch(r"[\d.]+, (-1|\d+( \d+)*)", line) for line in lines)
    rows = _siim_rows(siim)
    stems = {p.stem for p in siim.image_root.rglob("*.dcm")}
    assert set(rows) == stems
    positives = [rles for rles in rows.values() if rles != [" -1"]]
    assert len(positives) == siim.n_positive == round(N * 0.5)
    assert all(" -1" not in rles for rles in positives)


def test_siim_labels_are_the_generated_masks(siim: DemoSummary) -> None:
    by_id = {p.stem: p for p in siim.image_root.rglob("*.dcm")}
    for i, (image_id, rles) in enumerate(_siim_rows(siim).items()):
        positive = rles != [" -1"]
        image, mask = synth_chest(np.random.default_rng([SEED, i]), SIZE, positive=positive)
        np.testing.assert_array_equal(combine_masks(rles, SIZE, SIZE), mask)
        pixels = pydicom.dcmread(by_id[image_id]).pixel_array.astype(np.int16)
        assert np.abs(pixels - image).mean() < 1.5  # only JPEG loss between them
        if positive:
            inside = mask.astype(bool)
            ring = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=6).astype(bool)
            assert pixels[inside].mean() + 15 < pixels[ring & ~inside].mean()


def test_siim_separate_pieces_can_be_separate_rows(tmp_path: Path) -> None:
    multi = []
    for seed in range(4):
        summary = write_siim_demo(tmp_path / str(seed), n=12, seed=seed, size=128)
        multi += [rles for rles in _siim_rows(summary).values() if len(rles) > 1]
    assert multi, "no image written as several rows"
    for rles in multi:
        masks = [rle_decode(rle, 128, 128) for rle in rles]
        assert int(sum(m.astype(int) for m in masks).max()) == 1  # instances are disjoint
        for m in masks:  # each instance is one connected piece
            assert cv2.connectedComponents(m, connectivity=8)[0] == 2


# ---------------------------------------------------------------- NIH


def test_nih_images_are_grey_pngs_of_the_generated_chests(nih: DemoSummary) -> None:
    lines = nih.labels_csv.read_bytes().decode().split("\r\n")[1:-1]
    assert len(lines) == nih.n_images == N
    for i, line in enumerate(lines):
        name, findings = line.split(",")[:2]
        path = nih.image_root / "images_001" / "images" / name
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "L", (SIZE, SIZE))
            pixels = np.asarray(im)
        expected, _ = synth_chest(
            np.random.default_rng([SEED, i]), SIZE, positive="Pneumothorax" in findings
        )
        np.testing.assert_array_equal(pixels, expected)


def test_nih_header_is_the_real_2017_header(nih: DemoSummary, shared_data: Path) -> None:
    with gzip.open(shared_data / "nih" / "Data_Entry_2017.csv.gz", "rb") as f:
        real = f.readline()
    assert nih.labels_csv.read_bytes().split(b"\n", 1)[0] + b"\n" == real


def test_nih_rows_have_the_2017_format(nih: DemoSummary) -> None:
    raw = nih.labels_csv.read_bytes()
    assert raw.endswith(b"\r\n") and raw.count(b"\n") == raw.count(b"\r\n") == N + 1
    names = sorted(p.name for p in (nih.image_root / "images_001" / "images").glob("*.png"))
    rows = [line.split(",") for line in raw.decode().split("\r\n")[1:-1]]
    assert [r[0] for r in rows] == names  # sorted like the real file, one row per image
    known = set(NIH_FINDINGS)
    for name, findings, follow, patient, age, sex, view, w, h, sx, sy in rows:
        assert re.fullmatch(r"\d{8}_\d{3}\.png", name) and name == f"{patient}_{follow}.png"
        labels = findings.split("|")
        assert findings == "No Finding" or (set(labels) <= known and labels == sorted(labels))
        assert re.fullmatch(r"\d{3}Y", age) and sex in "MF" and view in ("PA", "AP")
        assert w.isdigit() and h.isdigit() and sx == sy and float(sx) > 0
    positives = [r for r in rows if "Pneumothorax" in r[1].split("|")]
    assert len(positives) == nih.n_positive == round(N * 0.3)


def test_nih_split_lists_are_patient_disjoint(nih: DemoSummary) -> None:
    lists = {}
    for name in ("train_val_list.txt", "test_list.txt"):
        raw = (nih.out_dir / name).read_bytes()
        assert not raw.endswith(b"\n")  # like the official lists
        lists[name] = raw.decode().split("\n")
    train, test = lists["train_val_list.txt"], lists["test_list.txt"]
    assert train and test and test[0]
    images = {p.name for p in (nih.image_root / "images_001" / "images").glob("*.png")}
    assert sorted(train + test) == sorted(images)
    assert not {n.split("_")[0] for n in train} & {n.split("_")[0] for n in test}


# ---------------------------------------------------------------- both


@pytest.mark.parametrize("writer", [write_siim_demo, write_nih_demo])
def test_same_seed_same_bytes_other_seed_other_bytes(writer, tmp_path: Path) -> None:
    first = _files(writer(tmp_path / "a", n=4, seed=7, size=128).out_dir)
    again = _files(writer(tmp_path / "b", n=4, seed=7, size=128).out_dir)
    other = _files(writer(tmp_path / "c", n=4, seed=8, size=128).out_dir)
    assert first == again
    images = [k for k in first if k.endswith((".dcm", ".png"))]
    assert len(images) == 4
    other_images = {v for k, v in other.items() if k.endswith((".dcm", ".png"))}
    assert not {first[k] for k in images} & other_images


@pytest.mark.parametrize("writer", [write_siim_demo, write_nih_demo])
def test_progress_counts_images(writer, tmp_path: Path) -> None:
    seen: list[int] = []
    writer(tmp_path, n=3, size=64, progress=seen.append)
    assert seen == [1, 2, 3]


@pytest.mark.parametrize("bad", [{"n": 0}, {"size": 32}, {"positive_fraction": 1.5}])
def test_bad_settings_raise_config_error(bad: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        write_siim_demo(tmp_path, **{"n": 2, "size": 64, **bad})
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- SIIM drawn from NIH


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> DemoPair:
    return write_demo_pair(
        tmp_path_factory.mktemp("pair"), n_nih=40, n_siim=16, seed=SEED, size=128
    )


def test_every_siim_image_is_an_nih_image_with_the_same_finding(pair: DemoPair) -> None:
    xref = read_nih_xref(pair.xref)  # the real file's reader: SIIM id -> NIH patient
    lines = pair.xref.read_text().splitlines()
    assert lines[0] == "Kaggle_ID,NIH_ID" and len(lines) == 1 + pair.siim.n_images == 17
    nih_rows = {
        r.split(",")[0]: r.split(",")[1] for r in pair.nih.labels_csv.read_text().splitlines()[1:]
    }
    dicoms = {p.stem: p for p in pair.siim.image_root.rglob("*.dcm")}
    labels = _siim_rows(pair.siim)
    patients = set()
    for line in lines[1:]:
        siim_id, nih_name = line.split(",")
        assert xref[siim_id] == nih_name[:8]
        ds = pydicom.dcmread(dicoms[siim_id])
        patients.add(ds.PatientID)
        with Image.open(pair.nih.image_root / "images_001" / "images" / nih_name) as im:
            nih_pixels = np.asarray(im).astype(np.int16)
        assert np.abs(ds.pixel_array.astype(np.int16) - nih_pixels).mean() < 1.5  # JPEG only
        nih_positive = "Pneumothorax" in nih_rows[nih_name].split("|")
        assert (labels[siim_id] != [" -1"]) == nih_positive
    assert len(patients) == 16  # SIIM's per-image pseudonyms: only the xref links them
    assert pair.siim.n_positive == 8  # enriched to half, from 30% in NIH
    assert len({name[:8] for name in (line.split(",")[1] for line in lines[1:])}) < 16


def test_siim_masks_outline_the_nih_images_pneumothorax(pair: DemoPair) -> None:
    nih_order = [r.split(",")[0] for r in pair.nih.labels_csv.read_text().splitlines()[1:]]
    rows = _siim_rows(pair.siim)
    for line in pair.xref.read_text().splitlines()[1:]:
        siim_id, nih_name = line.split(",")
        i = nih_order.index(nih_name)  # NIH image i is drawn from rng [seed, i]
        positive = rows[siim_id] != [" -1"]
        _, mask = synth_chest(np.random.default_rng([SEED, i]), 128, positive=positive)
        np.testing.assert_array_equal(combine_masks(rows[siim_id], 128, 128), mask)


def test_pair_is_deterministic_and_refuses_impossible_draws(tmp_path: Path) -> None:
    first = _files(write_demo_pair(tmp_path / "a", n_nih=20, n_siim=8, seed=1, size=64).xref.parent)
    again = _files(write_demo_pair(tmp_path / "b", n_nih=20, n_siim=8, seed=1, size=64).xref.parent)
    assert first == again
    with pytest.raises(ConfigError, match="cannot be drawn"):
        write_demo_pair(tmp_path / "c", n_nih=20, n_siim=18, seed=1, size=64)
