"""``ingest dicom --labels-seg``: DICOM SEG objects as labels, on real SIIM DICOMs.

The SEGs are built here with highdicom directly (not with pneumo's SEG writer), over the
headers of the real sample DICOMs; every expected mask is drawn by hand with numpy.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import boto3
import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.sr.codedict import codes

from pneumo.ingest.batch import BatchConfig, BatchSummary
from pneumo.ingest.seg import read_seg_labels
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import manifest
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import open_store

SIDE = 1024  # every SIIM sample DICOM


def segment(number: int, label: str, kind: pydicom.sr.coding.Code) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=kind,
        algorithm_type="MANUAL",
    )


def write_seg(path: Path, source: pydicom.Dataset, planes: np.ndarray, segments, **kw) -> None:
    """A SEG of ``planes`` ([rows, cols, segments]) over ``source``, as a tool would write."""
    with warnings.catch_warnings():  # highdicom's warning about SIIM's one-part PatientName
        warnings.simplefilter("ignore")
        seg = _segmentation(source, planes, segments, **kw)
    seg.save_as(path)


def _segmentation(source: pydicom.Dataset, planes: np.ndarray, segments, **kw):
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=planes[None],
        segmentation_type=kw.pop("segmentation_type", "BINARY"),
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=[0.168, 0.168], slice_thickness=1),
        omit_empty_frames=False,
        **kw,
    )


def box(top: int, left: int, bottom: int, right: int, rows: int = SIDE) -> np.ndarray:
    out = np.zeros((rows, rows), bool)
    out[top:bottom, left:right] = True
    return out


@dataclass(frozen=True)
class Case:
    ids: list[str]  # the five images ingested, sorted
    expected: dict[str, np.ndarray]  # image id -> the mask it must be stored with
    segs: Path
    summary: BatchSummary
    dataset: Path
    unknown_seg: Path
    not_a_seg: Path
    unknown_uid: str


@pytest.fixture(scope="module")
def case(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Case:
    root = tmp_path_factory.mktemp("seg")
    images, segs = root / "dicom", root / "segs"
    images.mkdir()
    segs.mkdir()
    paths = sorted((shared_data / "siim" / "sample_images").glob("*.dcm"))[:5]
    for p in paths:
        shutil.copy(p, images / p.name)
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    ids = [str(h.SOPInstanceUID) for h in heads]
    ptx, lung = codes.SCT.Pneumothorax, codes.SCT.Lung
    expected: dict[str, np.ndarray] = {}

    # 0: two pneumothorax instances (overlapping: OR) and a lung segment, left out.
    a, b, lungs = box(100, 200, 300, 260), box(250, 240, 400, 500), box(0, 0, 900, 900)
    write_seg(
        segs / "two.dcm",
        heads[0],
        np.stack([a, lungs, b], axis=-1).astype(np.uint8),
        [segment(1, "PTX upper", ptx), segment(2, "Lungs", lung), segment(3, "PTX 2", ptx)],
    )
    # ... and a second SEG of the same image (another reader's): OR-ed with the first.
    c = box(600, 700, 650, 800)
    write_seg(segs / "again.dcm", heads[0], c[..., None].astype(np.uint8),
              [segment(1, "Pneumothorax", ptx)])  # fmt: skip
    expected[ids[0]] = a | b | c
    # 1: fractional: a pixel is in at >= 0.5 (50 of 100), out at 0.49.
    frac = np.zeros((SIDE, SIDE), np.float32)
    frac[10:20, 10:20] = 0.5
    frac[30:40, 30:40] = 0.49
    frac[50:60, 500:700] = 1.0
    write_seg(
        segs / "fractional.dcm",
        heads[1],
        frac[..., None],
        [segment(1, "Pneumothorax", ptx)],
        segmentation_type="FRACTIONAL",
        max_fractional_value=100,
    )
    expected[ids[1]] = box(10, 10, 20, 20) | box(50, 500, 60, 700)
    # 2: an empty frame: a negative image, stored with an empty mask.
    write_seg(segs / "empty.dcm", heads[2], np.zeros((SIDE, SIDE, 1), np.uint8),
              [segment(1, "Pneumothorax", ptx)])  # fmt: skip
    expected[ids[2]] = np.zeros((SIDE, SIDE), bool)
    # 3: a SEG of a lung only: no pneumothorax segment, its image is quarantined.
    write_seg(segs / "lung.dcm", heads[3], lungs[..., None].astype(np.uint8),
              [segment(1, "Lungs", lung)])  # fmt: skip
    # 4: no SEG at all: the image is stored unlabelled.
    # A SEG of an image that is neither in the batch nor in the dataset.
    stranger = pydicom.Dataset(heads[4])
    stranger.file_meta = heads[4].file_meta
    unknown_uid = str(hd.UID())
    stranger.SOPInstanceUID = unknown_uid
    (segs / "sub").mkdir()
    write_seg(segs / "sub" / "unknown.dcm", stranger, a[..., None].astype(np.uint8),
              [segment(1, "Pneumothorax", ptx)])  # fmt: skip
    # A DICOM image where a SEG should be.
    shutil.copy(paths[4], segs / "image.dcm")

    dataset = root / "ds"
    cfg = SiimConfig(
        dicom_root=str(images),
        labels_seg=str(segs),
        batch=BatchConfig(out=str(dataset)),
    )
    summary = ingest_siim(cfg)
    return Case(ids, expected, segs, summary, dataset, segs / "sub" / "unknown.dcm",
                segs / "image.dcm", unknown_uid)  # fmt: skip


def stored(dataset: Path) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """The manifest rows and the stored masks, by image id (read from the tar shards)."""
    rows = {r["image_id"]: r for r in manifest.read(open_store(dataset)).to_pylist()}
    by_key: dict[str, np.ndarray] = {}
    for tar in sorted(dataset.glob("shards/**/*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if ext == "mask.png":
                    png = Image.open(io.BytesIO(tf.extractfile(m).read()))
                    by_key[key] = np.array(png) > 0
    masks = {i: by_key[r["key"]] for i, r in rows.items() if r["key"] in by_key}
    return rows, masks


def test_segments_are_or_ed_and_fractions_thresholded(case: Case) -> None:
    rows, masks = stored(case.dataset)
    for image_id, want in case.expected.items():
        assert masks[image_id].shape == (SIDE, SIDE)
        assert np.array_equal(masks[image_id], want), image_id
        assert rows[image_id]["has_ptx"] == bool(want.any())
        assert rows[image_id]["mask_area_px"] == int(want.sum())
    assert case.summary.ingested == 4  # 0, 1, 2 labelled; 4 without a SEG
    unlabelled = rows[case.ids[4]]
    assert unlabelled["has_ptx"] is None and case.ids[4] not in masks


def test_unusable_and_unmatched_segs_are_quarantined_with_their_codes(case: Case) -> None:
    q = manifest.read(open_store(case.dataset), table="quarantine").to_pylist()
    by_source = {Path(r["source"]).name: r for r in q}
    assert set(by_source) == {"unknown.dcm", "image.dcm", case.ids[3] + ".dcm"}, by_source
    unknown = by_source["unknown.dcm"]
    assert unknown["reason_code"] == "seg-no-image"
    assert case.unknown_uid in unknown["reason"]
    assert by_source["image.dcm"]["reason_code"] == "bad-seg"
    assert "not a DICOM Segmentation" in by_source["image.dcm"]["reason"]
    lung_only = by_source[case.ids[3] + ".dcm"]  # the image, quarantined for its SEG
    assert lung_only["reason_code"] == "bad-seg"
    assert "lung.dcm" in lung_only["reason"] and "Pneumothorax" in lung_only["reason"]
    assert case.summary.quarantined == 3


def test_a_seg_frame_of_another_size_is_refused(shared_data: Path, tmp_path: Path) -> None:
    path = sorted((shared_data / "siim" / "sample_images").glob("*.dcm"))[0]
    head = pydicom.dcmread(path, stop_before_pixels=True)
    small = pydicom.Dataset(head)
    small.file_meta = head.file_meta
    small.Rows = small.Columns = 512  # a SEG drawn on a downscaled copy of the image
    (tmp_path / "segs").mkdir()
    write_seg(tmp_path / "segs" / "small.dcm", small, box(1, 1, 9, 9, 512)[..., None].astype(
        np.uint8), [segment(1, "Pneumothorax", codes.SCT.Pneumothorax)])  # fmt: skip
    (tmp_path / "dicom").mkdir()
    shutil.copy(path, tmp_path / "dicom" / path.name)
    cfg = SiimConfig(
        dicom_root=str(tmp_path / "dicom"),
        labels_seg=str(tmp_path / "segs"),
        batch=BatchConfig(out=str(tmp_path / "ds")),
    )
    summary = ingest_siim(cfg)
    assert summary.ingested == 0 and summary.quarantined == 1
    (row,) = manifest.read(open_store(tmp_path / "ds"), table="quarantine").to_pylist()
    assert "frame 512x512, image 1024x1024" in row["reason"]
    assert row["reason_code"] == "bad-seg"


def test_labels_and_labels_seg_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        SiimConfig(
            dicom_root=str(tmp_path),
            labels=tmp_path / "x.csv",
            labels_seg=str(tmp_path),
            batch=BatchConfig(out=str(tmp_path / "ds")),
        )
    with pytest.raises(ConfigError, match="no .dcm files"):
        read_seg_labels(str(tmp_path))


def test_segs_are_read_from_s3_as_from_a_folder(case: Case, s3_bucket: str) -> None:
    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for path in sorted(case.segs.rglob("*.dcm")):
        s3.upload_file(str(path), bucket, f"segs/{path.relative_to(case.segs).as_posix()}")
    local, remote = read_seg_labels(str(case.segs)), read_seg_labels(f"{s3_bucket}/segs")
    assert remote.labels == local.labels and remote.shapes == local.shapes
    assert len(remote.labels) == 4 and remote.digest == local.digest  # 3 images, 1 stranger
    assert [p.reason for p in remote.problems] == [p.reason for p in local.problems]
    assert read_seg_labels(str(case.segs), workers=2) == local  # forked readers, same labels
