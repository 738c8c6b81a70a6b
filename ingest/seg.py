"""DICOM Segmentation objects as labels (``pneumo ingest dicom --labels-seg SEG_ROOT``).

Annotation tools (OHIF, MONAI Label, 3D Slicer) and ``pneumo predict --seg-out`` export
masks as DICOM SEG objects (SOP Class 1.2.840.10008.5.1.4.1.1.66.4) that reference their
source images by SOP Instance UID, the id ingest keys images by. Each SEG under SEG_ROOT is
read with highdicom; for every image it references, the frame(s) highdicom maps back to
that image (its rows x cols) become the image's label:

* the segments that are pneumothorax (property type SNOMED CT 36118008, or a label that
  says "pneumothorax") are OR-ed, as SIIM's several RLE rows for one image are; other
  segments (a lung, a tube) are left out; a SEG with no pneumothorax segment is refused;
* a FRACTIONAL SEG is thresholded: a pixel is in when its value is at least half the
  maximum (probability or occupancy >= 0.5);
* several SEGs naming one image are OR-ed too.

A label is carried as the SIIM RLE of its mask (a :class:`~pneumo.ingest.labels.SiimLabel`),
so a SEG-labelled image is stored, hashed and relabelled exactly as a CSV-labelled one.
A SEG that cannot be used becomes a :class:`~pneumo.ingest.labels.LabelProblem` (its images,
when it names them, are quarantined rather than stored with a partial mask); one that
references no image of the batch or the dataset is quarantined by the caller.

Privacy: a SEG carries its source's patient module. No value of it is read, logged or put in
a message: pydicom and highdicom warnings (which quote values) are silenced while reading,
and a failure inside highdicom is reported by its exception's type only.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.uid import SegmentationStorage

from pneumo.ingest.labels import LabelProblem, SiimLabel
from pneumo.ingest.rle import rle_encode
from pneumo.ingest.sources import SourceFile, list_sources, read_input, run_ordered
from pneumo.shards.errors import ConfigError

log = logging.getLogger(__name__)

PNEUMOTHORAX_CODE = "36118008"  # SNOMED CT; older SEGs write the scheme as SRT
_SNOMED_SCHEMES = ("SCT", "SRT", "SNM3")
FRACTION_THRESHOLD = 0.5


@dataclass(frozen=True, kw_only=True)
class SegMask:
    """One image's mask from one SEG: its RLE and the frame's size."""

    image_id: str
    rle: str
    rows: int
    cols: int


@dataclass(frozen=True, kw_only=True)
class SegLabels:
    """The labels of every SEG under a root.

    Attributes:
        labels: image id -> its label (the RLEs of its masks, one per SEG naming it).
        shapes: image id -> the (rows, cols) of its SEG frames, to check against the image.
        sources: image id -> the SEG files naming it (for messages and quarantine rows).
        problems: the SEGs (or their images) that cannot be used.
        digest: a hash of all of it, which names the batch with the DICOMs.
        n_files: SEG files read.
    """

    labels: dict[str, SiimLabel] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    problems: list[LabelProblem] = field(default_factory=list)
    digest: str = ""
    n_files: int = 0


class _Bad(Exception):
    """Why one SEG cannot be used (our words, no header value)."""


def read_seg_labels(root: str, workers: int = 1) -> SegLabels:
    """Read every ``*.dcm`` SEG under ``root`` (folder or ``s3://`` prefix) into labels.

    Raises:
        ConfigError: no ``.dcm`` file under ``root``.
        StoreError: a listed file cannot be read (the batch stops; rerun to resume).
    """
    files = list_sources(root, [".dcm"])
    if not files:
        raise ConfigError(f"--labels-seg {root}: no .dcm files there")
    found: dict[str, list[SegMask]] = {}
    named_by: dict[str, list[str]] = {}
    problems: list[LabelProblem] = []
    digest = hashlib.sha256()
    for src, result in zip(files, run_ordered(_read_one, files, workers=workers), strict=True):
        masks, bad, refs = result
        digest.update(f"{src.rel}\n{bad}\n".encode("utf-8", "surrogateescape"))
        if bad is not None:
            problems.extend(
                LabelProblem(source=src.name, reason=bad, image_id=ref) for ref in refs or [None]
            )
            continue
        for mask in masks:
            digest.update(f"{mask.image_id} {mask.rows} {mask.cols} {mask.rle}\n".encode())
            found.setdefault(mask.image_id, []).append(mask)
            named_by.setdefault(mask.image_id, []).append(src.name)
    out = _combine(found, named_by, problems)
    log.info(
        "%s: %d SEG files, %d images labelled (%d positive), %d problems",
        root,
        len(files),
        len(out.labels),
        sum(label.has_ptx for label in out.labels.values()),
        len(out.problems),
    )
    return SegLabels(
        labels=out.labels,
        shapes=out.shapes,
        sources=out.sources,
        problems=out.problems,
        digest=digest.hexdigest(),
        n_files=len(files),
    )


def _combine(
    found: dict[str, list[SegMask]], named_by: dict[str, list[str]], problems: list[LabelProblem]
) -> SegLabels:
    """One label per image: its SEGs' masks (OR-ed when the label is applied)."""
    out = SegLabels(problems=list(problems))
    bad_ids = {p.image_id for p in problems if p.image_id}
    for image_id in sorted(found):
        masks, names = found[image_id], named_by[image_id]
        shapes = {(m.rows, m.cols) for m in masks}
        if len(shapes) > 1:
            sizes = ", ".join(f"{r}x{c}" for r, c in sorted(shapes))
            reason = f"bad SEG: the SEGs of {image_id} differ in size ({sizes})"
            out.problems.append(LabelProblem(source=names[0], reason=reason, image_id=image_id))
            continue
        if image_id in bad_ids:
            continue
        rles = tuple(sorted({m.rle for m in masks if m.rle != "-1"}))
        out.labels[image_id] = SiimLabel(image_id=image_id, rles=rles, rows=())
        out.shapes[image_id] = shapes.pop()
        out.sources[image_id] = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1})"
    return out


def _read_one(src: SourceFile) -> tuple[list[SegMask], str | None, list[str] | None]:
    """(masks, None, refs) for a usable SEG; ([], why, refs) for one that is not (refs:
    the images it names, when it could be read that far)."""
    data = read_input(src)
    refs: list[str] | None = None
    try:
        with quiet_dicom():
            seg = _parse(data)
            refs = _referenced(seg)
            return [_mask(seg, ref) for ref in refs], None, refs
    except _Bad as e:
        return [], f"bad SEG: {e}", refs


def _parse(data: bytes) -> hd.seg.Segmentation:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except Exception as e:  # pydicom raises many types for what is not DICOM
        raise _Bad(f"not a readable DICOM file ({type(e).__name__})") from e
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class != SegmentationStorage:
        raise _Bad(f"not a DICOM Segmentation (SOP Class {sop_class[:64] or 'missing'})")
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as e:  # highdicom's messages may quote values: the type only
        raise _Bad(f"highdicom cannot read it ({type(e).__name__})") from e
    kind = seg.segmentation_type.value
    if kind not in ("BINARY", "FRACTIONAL"):
        raise _Bad(f"SegmentationType {kind} is not supported (BINARY or FRACTIONAL)")
    return seg


def _referenced(seg: hd.seg.Segmentation) -> list[str]:
    try:
        uids = sorted({str(sop) for _, _, sop in seg.get_source_image_uids()})
    except Exception as e:
        raise _Bad(f"its referenced images cannot be read ({type(e).__name__})") from e
    if not uids:
        raise _Bad("it references no source image (Referenced Series Sequence is empty)")
    return uids


def pneumothorax_segments(seg: hd.seg.Segmentation) -> list[int]:
    """The numbers of the segments that are pneumothorax (by code, else by label)."""
    out = []
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        kind = desc.segmented_property_type
        coded = kind.value == PNEUMOTHORAX_CODE and kind.scheme_designator in _SNOMED_SCHEMES
        if coded or "pneumothorax" in str(desc.segment_label).lower():
            out.append(number)
    return out


def _mask(seg: hd.seg.Segmentation, image_id: str) -> SegMask:
    """The OR of the pneumothorax segments over the frame(s) of one source image."""
    numbers = pneumothorax_segments(seg)
    if not numbers:
        raise _Bad(
            f"none of its {len(list(seg.segment_numbers))} segments is Pneumothorax "
            f"(SNOMED CT {PNEUMOTHORAX_CODE}, or a label naming it)"
        )
    try:
        pixels = seg.get_pixels_by_source_instance(
            [image_id], segment_numbers=numbers, combine_segments=False, rescale_fractional=True
        )
    except Exception as e:
        raise _Bad(f"its frames for {image_id} cannot be read ({type(e).__name__})") from e
    planes = np.asarray(pixels)[0]  # [rows, cols, segments]
    if seg.segmentation_type.value == "FRACTIONAL":
        mask = (planes >= FRACTION_THRESHOLD).any(axis=-1)
    else:
        mask = (planes > 0).any(axis=-1)
    rows, cols = mask.shape
    return SegMask(image_id=image_id, rle=rle_encode(mask), rows=rows, cols=cols)


@contextmanager
def quiet_dicom() -> Iterator[None]:
    """No pydicom or highdicom warning or log line while in: they quote header values."""
    loggers = [logging.getLogger(name) for name in ("pydicom", "highdicom")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), pydicom_config.disable_value_validation():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
