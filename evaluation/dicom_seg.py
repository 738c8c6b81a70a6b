"""Predicted masks as DICOM Segmentation objects (``pneumo predict --seg-out DIR``).

One SEG per source DICOM (SOP Class 1.2.840.10008.5.1.4.1.1.66.4, built by highdicom): a
BINARY segmentation with one segment, "Pneumothorax" (SNOMED CT 36118008, category
"Morphologically Abnormal Structure" 49755003), its one frame the mask at the source's own
rows x cols (an empty prediction is an empty frame, not a missing one), referencing its source
by study, series and SOP Instance UID. Its Algorithm Identification names pneumo, its version
and the run (name, checkpoint, step). The file is named by the source's SOPInstanceUID.

UIDs are derived, not random: the series from (algorithm, source study and series), the
instance from (that series, the source instance, the mask's bytes), so rerunning the same
run on the same files gives the same UIDs, and any other mask another UID.

Privacy: a SEG copies its source's patient and study modules (the standard asks for it: it is
the hospital's own file going back to its PACS). None of those values may reach a log: pydicom
and highdicom warnings quote them (a single-component PatientName is one), so both are
silenced while a SEG is built, and a failure is reported by our own words only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pneumo.ingest.seg import quiet_dicom
from pneumo.shards.errors import PneumoError
from pneumo.shards.store import Store, open_store

log = logging.getLogger(__name__)

SEGMENT_LABEL = "Pneumothorax"
PNEUMOTHORAX = codes.SCT.Pneumothorax  # SCT 36118008
CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003
SERIES_NUMBER = 9901  # a derived series, numbered apart from the acquisition's own
_LO = 64  # the longest Long String value DICOM allows
# Type 2 attributes a SEG copies from its source: present, possibly empty. An old file
# without them (ACR-NEMA style) still gets a SEG, with them empty.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


class SegError(PneumoError):
    """A source DICOM a SEG cannot be written for (the message names no patient value)."""


@dataclass(frozen=True, kw_only=True)
class SegAlgorithm:
    """Who made the masks, as every SEG's Algorithm Identification says.

    Attributes:
        run: the run's name (the last part of its URL).
        checkpoint: ``best``, ``last`` or a checkpoint file's name.
        step: the checkpoint's optimizer step.
        version: pneumo's version.
    """

    run: str
    checkpoint: str
    step: int
    version: str

    @classmethod
    def of(cls, run_url: str, checkpoint: str, step: int) -> SegAlgorithm:
        """The algorithm of ``checkpoint`` of the run at ``run_url`` (local or s3://)."""
        name = PurePosixPath(run_url.rstrip("/")).name or run_url
        which = PurePosixPath(checkpoint).name
        return cls(run=name, checkpoint=which, step=step, version=pneumo_version())

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name="pneumo",
            family=codes.DCM.ArtificialIntelligence,
            version=self.version[:_LO],
            parameters={
                "run": self.run[:_LO],
                "checkpoint": self.checkpoint[:_LO],
                "step": str(self.step),
            },
        )

    @property
    def key(self) -> str:
        return f"pneumo {self.version} run {self.run} {self.checkpoint} step {self.step}"


def pneumo_version() -> str:
    try:
        return importlib.metadata.version("pneumo")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


class SegWriter:
    """Writes one SEG per source into a folder or ``s3://`` prefix."""

    def __init__(self, out: str, algorithm: SegAlgorithm) -> None:
        self.store: Store = open_store(out)
        self.algorithm = algorithm
        self.written = 0

    def write(self, source: bytes, mask: np.ndarray) -> str:
        """Write the SEG of ``mask`` (bool ``[rows, cols]``) over the DICOM file ``source``.

        Returns:
            The name of the file written: ``<source SOPInstanceUID>.dcm``.

        Raises:
            SegError: the source cannot be referenced (no UIDs, several frames, another size).
        """
        header = source_header(source)
        check_source(header, mask.shape)
        data = build_seg(header, mask, self.algorithm)
        name = f"{_file_name(str(header.SOPInstanceUID))}.dcm"
        self.store.put(name, data)
        self.written += 1
        return name


def source_header(data: bytes) -> Dataset:
    """The source's header (no pixel data); SegError when it cannot be parsed."""
    force = data[128:132] != b"DICM"
    try:
        with quiet_dicom():
            return pydicom.dcmread(io.BytesIO(data), force=force, stop_before_pixels=True)
    except Exception as e:  # pydicom raises many types; the file was predicted already
        raise SegError(f"cannot read its header for a SEG ({type(e).__name__})") from e


def check_source(ds: Dataset, shape: tuple[int, ...]) -> None:
    """A SEG references its source by three UIDs and covers it frame for frame.

    Raises:
        SegError: a UID is missing (Kaggle's stage-2 test files have empty study and
            series UIDs), the source has several frames, or the mask is another size.
    """
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not str(ds.get(keyword, "") or "").strip():
            raise SegError(f"no {keyword}: a SEG could not reference this image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise SegError(f"{frames} frames: SEGs are written for single-frame images only")
    size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    if tuple(shape) != size:
        raise SegError(f"mask {shape[0]}x{shape[1]}, image {size[0]}x{size[1]}")


def build_seg(ds: Dataset, mask: np.ndarray, algorithm: SegAlgorithm) -> bytes:
    """The SEG file bytes of ``mask`` over the source header ``ds`` (checked)."""
    source = _with_type2(ds)
    series_uid = generate_uid(
        entropy_srcs=[algorithm.key, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]
    )
    frame = np.ascontiguousarray(mask, dtype=np.uint8)
    digest = hashlib.sha256(np.packbits(frame).tobytes() + str(frame.shape).encode()).hexdigest()
    sop_uid = generate_uid(entropy_srcs=[series_uid, str(ds.SOPInstanceUID), digest])
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=CATEGORY,
        segmented_property_type=PNEUMOTHORAX,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.identification(),
    )
    try:
        with quiet_dicom():
            seg = hd.seg.Segmentation(
                source_images=[source],
                pixel_array=frame,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[description],
                series_instance_uid=series_uid,
                series_number=SERIES_NUMBER,
                sop_instance_uid=sop_uid,
                instance_number=1,
                manufacturer="pneumo",
                manufacturer_model_name="pneumo",
                software_versions=algorithm.version[:_LO],
                device_serial_number=algorithm.run[:_LO],
                series_description=f"pneumo pneumothorax, run {algorithm.run}"[:_LO],
                content_label="PNEUMOTHORAX",
                content_description=f"pneumo {algorithm.version}, run {algorithm.run}"[:_LO],
                pixel_measures=_pixel_measures(ds),
                # An empty prediction is an empty frame (highdicom 0.28 would keep one frame
                # of an all-empty single-frame SEG anyway; said here, not left to it).
                omit_empty_frames=False,
            )
            out = io.BytesIO()
            seg.save_as(out)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        # highdicom's messages may quote header values: say only what failed.
        raise SegError(f"highdicom cannot build its SEG ({type(e).__name__})") from e
    return out.getvalue()


def _with_type2(ds: Dataset) -> Dataset:
    """``ds``, or a copy with its missing Type 2 patient and study attributes empty."""
    missing = [k for k in _TYPE2_COPIED if k not in ds]
    if not missing:
        return ds
    copy = Dataset(ds)  # shallow: the values are shared, none is changed
    copy.file_meta = ds.file_meta
    for keyword in missing:
        setattr(copy, keyword, "")
    return copy


def _pixel_measures(ds: Dataset) -> hd.PixelMeasuresSequence | None:
    """The source's PixelSpacing as the SEG's Pixel Measures; None when it has none.

    Given, because highdicom otherwise copies PixelSpacing without a SliceThickness from a
    CR source, which its own reader then refuses; the 2D image has no slice: 1 mm is a
    placeholder the reader needs. A zero or unreadable spacing is left out.
    """
    try:
        spacing = [float(v) for v in ds.get("PixelSpacing", None) or []]
    except (TypeError, ValueError):
        return None
    if len(spacing) != 2 or min(spacing) <= 0:
        return None
    return hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=1.0)


def _file_name(uid: str) -> str:
    """A file name for a UID (dots kept; anything unusual replaced)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in uid) or "image"
