"""Synthetic demo archives in the exact on-disk formats of SIIM-ACR and NIH ChestX-ray14.

The real data cannot ship with the repository, so ``pneumo`` can write a small stand-in that
every command runs on end to end: ``write_siim_demo`` (JPEG Baseline DICOMs + a stage-1
``train-rle.csv``) and ``write_nih_demo`` (grey PNGs + ``Data_Entry_2017.csv`` + the official
split lists). The images come from ``synth_chest``: a cartoon radiograph whose pneumothorax
is meant to be easy to learn (darker, unmarked, bounded by a pleural line), so that a short
CPU training run on the demo has something real to find.

Determinism: image ``i`` of a demo is ``synth_chest(numpy.random.default_rng([seed, i]), size,
positive=...)`` and is the ``i``-th image listed in the labels CSV; everything else (which
images are positive, UIDs, patient fields) comes from ``numpy.random.default_rng(seed)``.
Same arguments, same bytes.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from ingest.rle import rle_encode
from shards.errors import ConfigError

log = logging.getLogger(__name__)

Progress = Callable[[int], None]

# Byte for byte the first line of the original 2017 release (trailing comma included).
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
    "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
    "Pneumonia", "Pneumothorax",
)  # fmt: skip
# Detector geometries of the 2017 file: (width, height, pixel spacing), most common first.
_NIH_GEOMETRY = (
    (2500, 2048, "0.168"), (2992, 2991, "0.143"), (3056, 2544, "0.139"),
    (2500, 2048, "0.171"), (2048, 2500, "0.168"), (2021, 2021, "0.194311"),
)  # fmt: skip
# SIIM headers keep the float artefacts of the conversion (longer than DS allows).
_SIIM_SPACINGS = ("0.168", "0.139", "0.171", "0.14300000000000002", "0.19431099999999998")
_SIIM_UID_ROOT = "1.2.276.0.7230010.3.1"
_MIN_SIZE = 64
# The demo's patient-key secret: its data is synthetic, so a fixed secret is harmless and
# makes the demo's keys and splits the same on every machine. Never use it for real data.
DEMO_PATIENT_SECRET = "pneumo-demo-synthetic-patients"  # noqa: S105 - not a credential
_LOW_RES = 256  # anatomy is drawn at most this big and upscaled; the pneumothorax at full size
_N_VERTICES = 256


@dataclass(frozen=True, kw_only=True)
class DemoSummary:
    """What a demo writer produced.

    Attributes:
        out_dir: the demo's root folder.
        n_images: number of images written.
        n_positive: images with a pneumothorax.
        labels_csv: ``train-rle.csv`` (SIIM) or ``Data_Entry_2017.csv`` (NIH).
        image_root: the folder to give to ``pneumo ingest``.
    """

    out_dir: Path
    n_images: int
    n_positive: int
    labels_csv: Path
    image_root: Path


@dataclass(frozen=True, kw_only=True)
class _Lung:
    """A lung field in coordinates normalised to the image side (x right, y down)."""

    cx: float
    cy: float
    ax: float
    ay: float
    lateral: float  # -1: the lung on the image's left, +1: on its right

    def outline(self, retract: np.ndarray | None = None) -> np.ndarray:
        """Closed outline, ``(N, 2)``; ``retract`` (per vertex, 0..1) pulls it to the centre.

        The outline is star-shaped about the centre, so any retraction stays inside it.
        """
        t = np.linspace(0.0, 2 * np.pi, _N_VERTICES, endpoint=False)
        narrow = 0.85 + 0.15 * np.sin(t)  # narrower at the apex (sin < 0 is up)
        dome = np.sign(np.sin(t)) * np.abs(np.sin(t)) ** np.where(np.sin(t) > 0, 0.6, 1.0)
        scale = 1.0 if retract is None else 1.0 - retract
        x = self.cx + self.ax * np.cos(t) * narrow * scale
        y = self.cy + self.ay * dome * scale  # flattened base: the diaphragm
        return np.stack([x, y], axis=1)


def _fill(poly: np.ndarray, size: int) -> np.ndarray:
    """Rasterise a normalised polygon into a ``(size, size)`` uint8 0/1 mask."""
    canvas = np.zeros((size, size), np.uint8)
    pts = np.round(poly * size * 16).astype(np.int32)  # 4 fractional bits (shift=4)
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return canvas


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _lungs(rng: np.random.Generator) -> tuple[_Lung, _Lung]:
    j = rng.uniform(-1, 1, 6)
    cy = 0.47 + 0.03 * j[0]
    right = _Lung(
        cx=0.29 + 0.02 * j[1], cy=cy, ax=0.18 + 0.015 * j[2], ay=0.29 + 0.03 * j[3], lateral=-1
    )
    left = _Lung(
        cx=0.71 + 0.02 * j[4], cy=cy + 0.01, ax=0.17 + 0.015 * j[5], ay=0.28 + 0.02 * j[3],
        lateral=1,
    )  # fmt: skip
    return right, left


def _retraction(rng: np.random.Generator, lung: _Lung) -> np.ndarray:
    """How far (0..1) the collapsed lung pulls back from the chest wall, per outline vertex.

    The pleural air sits laterally, at the apex, or wraps around both, on one smooth arc.
    """
    t = np.linspace(0.0, 2 * np.pi, _N_VERTICES, endpoint=False)
    phi = rng.uniform(np.pi - 0.35, 1.5 * np.pi + 0.25)  # costophrenic .. lateral .. apical
    if lung.lateral > 0:
        phi = np.pi - phi  # mirror for the lung on the image's right
    half_width = rng.uniform(0.8, 1.6)
    depth = rng.uniform(0.2, 0.55)
    delta = np.angle(np.exp(1j * (t - phi)))
    window = np.where(np.abs(delta) < half_width, np.cos(0.5 * np.pi * delta / half_width), 0.0)
    ripple = 1.0 + 0.15 * np.sin(rng.integers(2, 5) * t + rng.uniform(0, 2 * np.pi))
    return np.clip(depth * window**2 * ripple, 0.0, 0.9)


def _pneumothorax(rng: np.random.Generator, lung: _Lung) -> np.ndarray:
    """A collapsed-lung outline whose gap to ``lung`` covers about 1-6% of the image."""
    full = _area(lung.outline())
    for _ in range(8):
        inner = lung.outline(_retraction(rng, lung))
        if 0.01 <= full - _area(inner) <= 0.06:
            break
    return inner


def _clean(mask: np.ndarray) -> np.ndarray:
    """Drop one-pixel slivers and stray pixels: keep the largest piece of the opened mask."""
    x, y, w, h = cv2.boundingRect(mask)
    crop = mask[y : y + h, x : x + w]
    opened = cv2.morphologyEx(crop, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if count > 1:  # else the band is too thin to open: keep it as drawn
        crop[:] = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return mask


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _vessels(rng: np.random.Generator, lung: _Lung, lo: int) -> np.ndarray:
    """Branching vessel-like lines fanning out from the hilum (0..1, not yet clipped)."""
    canvas = np.zeros((lo, lo), np.float32)
    n, steps = 34, 9
    hilum = np.array([lung.cx - 0.45 * lung.ax * lung.lateral, lung.cy - 0.03])
    base = np.where(lung.lateral < 0, np.pi, 0.0) + rng.uniform(-1.7, 1.7, n)
    angles = base[:, None] + np.cumsum(rng.normal(0, 0.28, (n, steps)), axis=1)
    length = rng.uniform(0.025, 0.045, (n, 1)) * np.ones((1, steps))
    walk = np.cumsum(np.stack([np.cos(angles), np.sin(angles)], -1) * length[..., None], 1)
    pts = hilum + np.concatenate([np.zeros((n, 1, 2)), walk], axis=1)
    pts = np.round(pts * lo * 16).astype(np.int32)
    cv2.polylines(canvas, list(pts[:, :4]), False, 1.0, 2, cv2.LINE_AA, 4)
    cv2.polylines(canvas, list(pts[:, 3:]), False, 0.75, 1, cv2.LINE_AA, 4)
    return cv2.GaussianBlur(canvas, (0, 0), 0.6)


def _ribs(rng: np.random.Generator, lo: int) -> np.ndarray:
    """Posterior rib arcs: they leave the spine, rise a little, then bend down laterally."""
    canvas = np.zeros((lo, lo), np.float32)
    first, gap = rng.uniform(0.11, 0.15), rng.uniform(0.055, 0.065)
    u = np.linspace(0.0, 1.0, 24)  # 0 at the spine, 1 at the lateral chest wall
    tops = first + gap * np.arange(10) + rng.normal(0, 0.004, 10)
    drop = rng.uniform(0.12, 0.17)
    y = tops[:, None] - 0.015 * np.sin(np.pi * u) + drop * u**2.5
    ribs = []
    for side in (-1.0, 1.0):
        x = 0.5 + side * (0.035 + 0.37 * u) * np.ones_like(y)
        ribs += list(np.round(np.stack([x, y], -1) * lo * 16).astype(np.int32))
    cv2.polylines(canvas, ribs, False, 1.0, max(1, round(0.02 * lo)), cv2.LINE_AA, 4)
    return cv2.GaussianBlur(canvas, (0, 0), 0.8)


def _solid(rng: np.random.Generator, lo: int) -> np.ndarray:
    """Mediastinum (widening from the neck down) and heart: 0..1 at ``lo`` px."""
    yy, xx = np.mgrid[0:lo, 0:lo].astype(np.float32) / lo
    width = 0.045 + 0.03 * np.clip(yy / 0.45, 0, 1)
    med = np.exp(-(((xx - 0.5) / width) ** 4)) * (yy > 0.04)
    hx, hy, ha, hb = rng.uniform([0.53, 0.65, 0.13, 0.10], [0.57, 0.69, 0.17, 0.13])
    heart = (((xx - hx) / ha) ** 2 + ((yy - hy) / hb) ** 2 < 1).astype(np.float32)
    return np.maximum(med, cv2.GaussianBlur(heart, (0, 0), 0.01 * lo))


def _anatomy(rng: np.random.Generator, fields: np.ndarray, solid: np.ndarray) -> np.ndarray:
    """Body, lung fields (dark, unmarked), mediastinum, heart and ribs at ``lo`` px."""
    lo = fields.shape[0]
    levels = rng.uniform([10, 140, 65, 185, 18], [30, 170, 90, 215, 28])
    bg, soft, lung, dense, rib = (float(v) for v in levels)
    yy, xx = np.mgrid[0:lo, 0:lo].astype(np.float32) / lo
    body = ((xx - 0.5) / 0.48) ** 2 + ((yy - 0.62) / 0.64) ** 2 < 1
    img = cv2.GaussianBlur(np.where(body, soft, bg).astype(np.float32), (0, 0), 0.02 * lo)
    soft_fields = cv2.GaussianBlur(fields, (0, 0), 0.006 * lo)
    gradient = 14 * (yy - 0.47) / 0.3 + 10 * (1 - np.abs(xx - 0.5) / 0.35)  # denser low/medial
    img -= soft_fields * (soft - lung - gradient)
    img = img * (1 - solid) + dense * solid
    thorax = cv2.dilate(soft_fields, np.ones((5, 5), np.uint8)) * (1 - 0.6 * solid)
    img += rib * _ribs(rng, lo) * thorax
    grain = rng.standard_normal((lo, lo), dtype=np.float32)  # quantum noise, at most 256 px
    return (img + 6 * _smooth_noise(rng, 6, lo) + 1.5 * grain).astype(np.float32)


def _markings(
    rng: np.random.Generator, lungs: tuple[_Lung, _Lung], fields: np.ndarray, solid: np.ndarray
) -> np.ndarray:
    """Lung markings (vessels + mottling) at ``lo`` px: what a pneumothorax lacks."""
    lo = fields.shape[0]
    lines = np.minimum(sum(_vessels(rng, lung, lo) for lung in lungs), 1.0)
    mottle = _smooth_noise(rng, lo // 4, lo)
    gain = float(rng.uniform(24, 34))
    return ((gain * lines + 8 * mottle) * fields * (1 - solid)).astype(np.float32)


def synth_chest(
    rng: np.random.Generator, size: int, *, positive: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic chest radiograph and its pneumothorax mask.

    Dark lung fields with vessel markings inside a brighter body, mediastinum, heart and
    rib arcs. A pneumothorax is a band along the lateral and/or apical edge of a lung (now
    and then both lungs) where the markings vanish and the field is darker and uniform,
    bounded on the inner side by a thin bright pleural line; the mask is exactly that band
    (the pleural line is outside it). With the same ``rng`` state, ``positive=False`` gives
    the same chest without the pneumothorax: the images differ only inside the mask and on
    the pleural line.

    Args:
        rng: the only source of randomness.
        size: output side in pixels (>= 64).
        positive: whether to draw a pneumothorax; ``None`` decides with a fair coin from ``rng``.

    Returns:
        ``(image, mask)``: ``(size, size)`` uint8 grey image and uint8 0/1 mask (all zero
        for a negative).
    """
    if positive is None:
        positive = bool(rng.random() < 0.5)
    lo = min(size, _LOW_RES)
    lungs = _lungs(rng)
    fields = np.maximum(*(_fill(lung.outline(), lo) for lung in lungs)).astype(np.float32)
    solid = _solid(rng, lo)
    anatomy, markings = _anatomy(rng, fields, solid), _markings(rng, lungs, fields, solid)
    if lo != size:
        anatomy = cv2.resize(anatomy, (size, size), interpolation=cv2.INTER_LINEAR)
        markings = cv2.resize(markings, (size, size), interpolation=cv2.INTER_LINEAR)
    air, line, contrast, shift = (
        float(v) for v in rng.uniform([36, 30, 0.85, -10], [48, 45, 1.15, 10])
    )
    # Drawn last, so that the same rng state gives the same chest with or without it.
    mask = np.zeros((size, size), np.uint8)
    if positive:  # the air has no markings, is darker, and has a pleural line on its inner side
        pleura = np.zeros((size, size), np.uint8)
        sides = (0, 1) if rng.random() < 0.25 else (int(rng.integers(2)),)
        for side in sides:
            _add_pneumothorax(rng, lungs[side], mask, pleura)
        markings[mask.view(bool)] = -air
        markings += np.float32(line) * pleura
    img = anatomy + markings
    img = (img - 110) * contrast + (110 + shift)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _add_pneumothorax(
    rng: np.random.Generator, lung: _Lung, mask: np.ndarray, pleura: np.ndarray
) -> None:
    """OR one pneumothorax of ``lung`` into ``mask`` and its pleural line into ``pleura``."""
    size = mask.shape[0]
    inner = _pneumothorax(rng, lung)
    region = _fill(lung.outline(), size) & (1 - _fill(inner, size))
    region = _clean(region)
    line = np.zeros_like(mask)
    pts = np.round(inner * size * 16).astype(np.int32)
    cv2.polylines(line, [pts], True, 1, max(2, round(size / 170)), cv2.LINE_8, 4)
    # Only the half of the line on the lung's side, and only along the air: a visceral pleura.
    near = cv2.dilate(region, np.ones((3, 3), np.uint8), iterations=max(2, round(size / 128)))
    np.bitwise_or(pleura, line & near & (1 - region), out=pleura)
    np.bitwise_or(mask, region, out=mask)


# ---------------------------------------------------------------- SIIM-ACR


def _check(n: int, size: int, positive_fraction: float) -> None:
    if n < 1:
        raise ConfigError(f"n={n}: a demo needs at least one image")
    if size < _MIN_SIZE:
        raise ConfigError(f"size={size}: use at least {_MIN_SIZE} pixels")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ConfigError(f"positive_fraction={positive_fraction}: give a value in [0, 1]")


def _positives(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    flags = np.zeros(n, bool)
    flags[rng.permutation(n)[: round(n * fraction)]] = True
    return flags


def _jpeg_frame(img: np.ndarray) -> bytes:
    """Baseline JPEG of a grey image, coded like SIIM's frames.

    Quality 92 gives exactly the quantisation table of the SIIM files; like them, the
    Huffman tables are optimised and there is no JFIF APP0 segment.
    """
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=92, optimize=True, progressive=False)
    data = buf.getvalue()
    if data[2:4] == b"\xff\xe0":
        data = data[:2] + data[4 + int.from_bytes(data[4:6], "big") :]
    return data


def _siim_uids(rng: np.random.Generator, number: int) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs as SIIM's converter made them."""
    stamp = 1517875159 + number // 160
    last = int(rng.integers(100002, 1000000))
    tail = f"8323329.{number}.{stamp}"
    # Study, series and instance share the tail; the last part counts down from the image.
    return (
        f"{_SIIM_UID_ROOT}.2.{tail}.{last - 1}",
        f"{_SIIM_UID_ROOT}.3.{tail}.{last - 2}",
        f"{_SIIM_UID_ROOT}.4.{tail}.{last}",
    )


def _raw(tag: int, vr: str, text: str) -> RawDataElement:
    """An element written as given: SIIM has values pydicom would refuse or reformat."""
    value = text.encode("ascii")
    value += b" " * (len(value) % 2)
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _siim_dataset(rng: np.random.Generator, uids: tuple[str, str, str], size: int) -> Dataset:
    """The SIIM header (same tags, same quirks), without pixel data."""
    study, series, sop = uids
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PNEUMO_DEMO"
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    view, patient = (
        ("PA", "AP")[int(rng.random() < 0.4)],
        str(uuid.UUID(bytes=rng.bytes(16), version=4)),
    )
    ds.update({"SpecificCharacterSet": "ISO_IR 100", "SOPClassUID": SecondaryCaptureImageStorage})
    ds.update({"SOPInstanceUID": sop, "StudyDate": "19010101", "StudyTime": "000000.00"})
    ds.update({"AccessionNumber": "", "Modality": "CR", "ConversionType": "WSD"})
    ds.update({"ReferringPhysicianName": "", "SeriesDescription": f"view: {view}"})
    ds.update({"PatientName": patient, "PatientID": patient, "PatientBirthDate": ""})
    ds.PatientSex = ("M", "F")[int(rng.integers(2))]
    ds[0x00101010] = _raw(0x00101010, "AS", str(int(rng.integers(2, 90))))
    ds.update({"BodyPartExamined": "CHEST", "ViewPosition": view})
    ds.update({"StudyInstanceUID": study, "SeriesInstanceUID": series, "StudyID": ""})
    ds.update({"SeriesNumber": 1, "InstanceNumber": 1, "PatientOrientation": ""})
    ds.update({"SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2"})
    ds.update({"Rows": size, "Columns": size})
    spacing = _SIIM_SPACINGS[int(rng.integers(len(_SIIM_SPACINGS)))]
    ds[0x00280030] = _raw(0x00280030, "DS", f"{spacing}\\{spacing}")
    ds.update({"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0})
    ds.update({"LossyImageCompression": "01", "LossyImageCompressionMethod": "ISO_10918_1"})
    return ds


def _write_dicom(ds: Dataset, img: np.ndarray, folder: Path) -> None:
    """Add the image as one encapsulated JPEG frame and write ``<SOPInstanceUID>.dcm``."""
    ds.PixelData = encapsulate([_jpeg_frame(img)], has_bot=False)  # empty offset table
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


def _rle_rows(rng: np.random.Generator, mask: np.ndarray) -> list[str]:
    """The label rows of one image: ``-1``, one row, or (mostly) one row per separate piece."""
    count, labels = cv2.connectedComponents(mask, connectivity=8)
    if count <= 2 or rng.random() < 0.25:
        return [rle_encode(mask)]
    return [rle_encode(labels == k) for k in range(1, count)]


def write_siim_demo(
    out_dir: Path,
    *,
    n: int = 64,
    seed: int = 0,
    size: int = 1024,
    positive_fraction: float = 0.5,
    progress: Progress | None = None,
) -> DemoSummary:
    """Write a SIIM-ACR-style training set: DICOMs plus a stage-1 ``train-rle.csv``.

    Layout: ``out_dir/dicom-images-train/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``
    (JPEG Baseline, 8-bit MONOCHROME2, Secondary Capture, SIIM's header tags and quirks)
    and ``out_dir/train-rle.csv`` (header ``ImageId, EncodedPixels``, a space before every
    EncodedPixels value, LF, rows in generation order).

    Args:
        out_dir: folder to write into (created).
        n: number of images.
        seed: seed of every random choice; same seed, same bytes.
        size: image side in pixels.
        positive_fraction: share of images with a pneumothorax (rounded to a count).
        progress: called with the number of images written so far.

    Raises:
        ConfigError: ``n``, ``size`` or ``positive_fraction`` out of range.
    """
    _check(n, size, positive_fraction)
    rng = np.random.default_rng(seed)
    flags = _positives(rng, n, positive_fraction)
    chests = [((seed, i), bool(flags[i])) for i in range(n)]
    return _write_siim(Path(out_dir), rng, chests, size, progress)[0]


def _write_siim(
    out_dir: Path,
    rng: np.random.Generator,
    chests: list[tuple[tuple[int, int], bool]],
    size: int,
    progress: Progress | None,
) -> tuple[DemoSummary, list[str]]:
    """The SIIM files of ``chests`` (``(entropy of the chest's rng, positive)`` per image),
    and the ImageIds given to them, in order."""
    n = len(chests)
    numbers = np.sort(rng.choice(np.arange(1, 20000), size=n, replace=False))
    root = out_dir / "dicom-images-train"
    lines, ids = ["ImageId, EncodedPixels"], []
    for i, (entropy, positive) in enumerate(chests):
        image_rng = np.random.default_rng(list(entropy))
        img, mask = synth_chest(image_rng, size, positive=positive)
        uids = _siim_uids(rng, int(numbers[i]))
        _write_dicom(_siim_dataset(rng, uids, size), img, root / uids[0] / uids[1])
        lines += [f"{uids[2]}, {rle}" for rle in _rle_rows(image_rng, mask)]
        ids.append(uids[2])
        if progress is not None:
            progress(i + 1)
    labels = out_dir / "train-rle.csv"
    labels.write_bytes(("\n".join(lines) + "\n").encode("ascii"))
    n_positive = sum(positive for _, positive in chests)
    log.info("SIIM demo: %d images (%d positive) in %s", n, n_positive, out_dir)
    summary = DemoSummary(
        out_dir=out_dir, n_images=n, n_positive=n_positive, labels_csv=labels, image_root=root
    )
    return summary, ids


# ---------------------------------------------------------------- NIH ChestX-ray14


def _nih_findings(rng: np.random.Generator, positive: bool) -> str:
    others = [f for f in NIH_FINDINGS if f != "Pneumothorax"]
    extra = int(rng.choice(3, p=[0.55, 0.3, 0.15]))
    if not positive:
        if rng.random() < 0.7:
            return "No Finding"
        extra = max(extra, 1)
    labels = [str(f) for f in rng.choice(others, size=extra, replace=False)]
    return "|".join(sorted(labels + (["Pneumothorax"] if positive else [])))


def _nih_patients(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """``(patient id, follow-up)`` per image: patients with 1-3 follow-ups, ids ascending."""
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(min(int(rng.integers(1, 4)), n - sum(counts)))
    ids = np.sort(rng.choice(np.arange(1, 30806), size=len(counts), replace=False))
    return [(int(pid), k) for pid, c in zip(ids, counts, strict=True) for k in range(c)]


def _nih_rows(
    rng: np.random.Generator, images: list[tuple[int, int]], flags: np.ndarray
) -> list[str]:
    """Data_Entry_2017 rows, one per image, in image order."""
    rows: list[str] = []
    person: dict[str, int | str] = {}
    for (pid, follow), positive in zip(images, flags, strict=True):
        if follow == 0:
            person = {"age": int(rng.integers(1, 95)), "sex": ("M", "F")[int(rng.integers(2))]}
        width, height, spacing = _NIH_GEOMETRY[int(rng.integers(len(_NIH_GEOMETRY)))]
        fields = (
            f"{pid:08d}_{follow:03d}.png", _nih_findings(rng, bool(positive)), f"{follow:03d}",
            f"{pid:08d}", f"{person['age']:03d}Y", person["sex"],
            ("PA", "AP")[int(rng.random() < 0.4)], str(width), str(height), spacing, spacing,
        )  # fmt: skip
        rows.append(",".join(fields))
    return rows


def _nih_split(rng: np.random.Generator, out_dir: Path, images: list[tuple[int, int]]) -> None:
    """Patient-disjoint ``train_val_list.txt`` / ``test_list.txt`` (about 80/20), LF, no
    final newline, like the official lists."""
    patients = sorted({pid for pid, _ in images})
    n_test = max(1, round(0.2 * len(patients))) if len(patients) > 1 else 0
    test = {int(p) for p in rng.permutation(patients)[:n_test]}
    names = [(pid in test, f"{pid:08d}_{k:03d}.png") for pid, k in images]
    for held_out, file in ((False, "train_val_list.txt"), (True, "test_list.txt")):
        text = "\n".join(name for t, name in names if t == held_out)
        (out_dir / file).write_bytes(text.encode("ascii"))


def write_nih_demo(
    out_dir: Path,
    *,
    n: int = 64,
    seed: int = 0,
    size: int = 1024,
    positive_fraction: float = 0.3,
    progress: Progress | None = None,
) -> DemoSummary:
    """Write an NIH ChestX-ray14-style set: PNGs, ``Data_Entry_2017.csv`` and split lists.

    Layout: ``out_dir/images_001/images/NNNNNNNN_FFF.png`` (8-bit grey), ``out_dir/
    Data_Entry_2017.csv`` in the original 2017 format (its exact header, CRLF, ages like
    ``058Y``), and patient-disjoint ``train_val_list.txt`` / ``test_list.txt``. Positive
    images carry ``Pneumothorax`` in Finding Labels (sometimes with other findings).

    Args:
        out_dir: folder to write into (created).
        n: number of images.
        seed: seed of every random choice; same seed, same bytes.
        size: image side in pixels.
        positive_fraction: share of images with a pneumothorax (rounded to a count).
        progress: called with the number of images written so far.

    Raises:
        ConfigError: ``n``, ``size`` or ``positive_fraction`` out of range.
    """
    _check(n, size, positive_fraction)
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    flags = _positives(rng, n, positive_fraction)
    images = _nih_patients(rng, n)
    folder = out_dir / "images_001" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (pid, follow) in enumerate(images):
        img, _ = synth_chest(np.random.default_rng([seed, i]), size, positive=bool(flags[i]))
        Image.fromarray(img).save(folder / f"{pid:08d}_{follow:03d}.png", "PNG")
        if progress is not None:
            progress(i + 1)
    labels = out_dir / "Data_Entry_2017.csv"
    lines = [NIH_HEADER, *_nih_rows(rng, images, flags)]
    labels.write_bytes("".join(line + "\r\n" for line in lines).encode("ascii"))
    _nih_split(rng, out_dir, images)
    log.info("NIH demo: %d images (%d positive) in %s", n, int(flags.sum()), out_dir)
    return DemoSummary(
        out_dir=out_dir, n_images=n, n_positive=int(flags.sum()),
        labels_csv=labels, image_root=out_dir,
    )  # fmt: skip


# ---------------------------------------------------------------- SIIM images are NIH images


@dataclass(frozen=True, kw_only=True)
class DemoPair:
    """An NIH demo and a SIIM demo drawn from its images, linked like the real data sets.

    Attributes:
        nih: the NIH ChestX-ray14-style set (``out_dir/nih``).
        siim: the SIIM-ACR-style set (``out_dir/siim``): every image is an NIH image.
        xref: ``out_dir/siim_to_nih_id.csv`` (``Kaggle_ID,NIH_ID``), the real file's format.
    """

    nih: DemoSummary
    siim: DemoSummary
    xref: Path


def write_demo_pair(
    out_dir: Path,
    *,
    n_nih: int = 400,
    n_siim: int = 200,
    seed: int = 0,
    size: int = 256,
    nih_positive_fraction: float = 0.3,
    siim_positive_fraction: float = 0.5,
    progress: Progress | None = None,
) -> DemoPair:
    """Write NIH and SIIM demo data whose patients overlap, as the real data sets' do.

    The SIIM-ACR images are ChestX-ray14 images; here each SIIM image is the same chest as
    one NIH demo image (same pixels up to JPEG loss, same pneumothorax, which the SIIM
    labels then outline), re-issued under a SIIM UID and a fresh per-image PatientID UUID.
    The NIH images of one patient may all become SIIM images, so SIIM patients have several
    images. ``siim_to_nih_id.csv`` links them; without it a SIIM patient cannot be found.
    SIIM images are drawn with pneumothorax enriched (``siim_positive_fraction``), as
    SIIM's were.

    Args:
        out_dir: folder to write ``nih/``, ``siim/`` and the xref into.
        n_nih, n_siim: images of each set (``n_siim`` of the ``n_nih`` become SIIM images).
        seed: seed of every random choice; same arguments, same bytes.
        size: image side in pixels.
        nih_positive_fraction, siim_positive_fraction: shares of pneumothorax images.
        progress: called with the number of images written so far (NIH, then SIIM).

    Raises:
        ConfigError: settings out of range, or too few NIH positives/negatives to draw the
            SIIM set from.
    """
    out_dir = Path(out_dir)
    _check(n_siim, size, siim_positive_fraction)
    nih = write_nih_demo(
        out_dir / "nih", n=n_nih, seed=seed, size=size,
        positive_fraction=nih_positive_fraction, progress=progress,
    )  # fmt: skip
    rows = [line.split(",") for line in nih.labels_csv.read_text().splitlines()[1:]]
    positive = np.array(["Pneumothorax" in r[1].split("|") for r in rows])
    n_pos = round(n_siim * siim_positive_fraction)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    if n_pos > len(pos) or n_siim - n_pos > len(neg) or n_siim > n_nih:
        raise ConfigError(
            f"{n_siim} SIIM images ({n_pos} positive) cannot be drawn from {n_nih} NIH images "
            f"({len(pos)} positive): raise n_nih or nih_positive_fraction"
        )
    rng = np.random.default_rng([seed, 1])  # its own stream: the NIH set's is untouched
    chosen = np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False),
                                     rng.choice(neg, n_siim - n_pos, replace=False)]))  # fmt: skip
    chests = [((seed, int(i)), bool(positive[i])) for i in chosen]

    def siim_progress(done: int) -> None:
        if progress is not None:
            progress(n_nih + done)

    siim, ids = _write_siim(out_dir / "siim", rng, chests, size, siim_progress)
    xref = out_dir / "siim_to_nih_id.csv"
    lines = ["Kaggle_ID,NIH_ID"] + [
        f"{uid},{rows[i][0]}" for uid, i in zip(ids, chosen, strict=True)
    ]
    xref.write_bytes(("\n".join(lines) + "\n").encode("ascii"))
    return DemoPair(nih=nih, siim=siim, xref=xref)
