"""Synthetic demo archives in the exact on-disk formats of SIIM-ACR and NIH ChestX-ray14.

The real data cannot ship with the repository, so ``pneumo`` can write a small stand-in that
every command runs on end to end: ``write_siim_demo`` (JPEG Baseline DICOMs + a stage-1
``train-rle.csv``) and ``write_nih_demo`` (grey PNGs + ``Data_Entry_2017.csv`` + the official
split lists). The images come from :func:`pneumo.synthetic.chest.synth_chest`: a cartoon
radiograph whose pneumothorax is meant to be easy to learn, with its exact mask.

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

from pneumo.ingest.rle import rle_encode
from pneumo.shards.errors import ConfigError
from pneumo.synthetic.chest import synth_chest

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
