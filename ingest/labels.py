"""Label files: SIIM-ACR RLE CSVs, NIH ChestX-ray14 Data_Entry, boxes, split lists, SIIM->NIH ids.

Every reader takes a plain file or its gzip (recognised by its magic bytes, whatever the
name), with or without a UTF-8 BOM, LF or CRLF. Column names and values are stripped, which
covers the SIIM variants: stage 1 (``ImageId, EncodedPixels`` and a leading space in every
value), stage 2 (no spaces), torchxrayvision's copy (space in the header only) and the
header-less 10-image sample with a BOM and no final newline.

A row that cannot be trusted becomes a :class:`LabelProblem` naming ``file:line``. An image
with any bad label row is left out of the result (quarantined) rather than stored with a
partial mask; its problems carry its id so the caller can report it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from io import StringIO
from pathlib import Path

from pneumo.ingest.dicom import MAX_AGE_YEARS, BadInput, parse_age
from pneumo.ingest.rle import EMPTY

log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_SIIM_COLUMNS = ("ImageId", "EncodedPixels")
# Whitespace-separated "gap length" pairs of non-negative integers, lengths > 0.
_RLE_PAIRS = re.compile(r"\d+\s+0*[1-9]\d*(?:\s+\d+\s+0*[1-9]\d*)*")
# Data_Entry columns we use, by position. The header is checked, not used to look columns
# up: its bracketed names contain commas ("OriginalImage[Width,Height]"), so a CSV reader
# splits them, and the 2017 file adds an empty column after a trailing comma.
_NIH_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)
_NO_FINDING = "No Finding"
_NIH_IMAGE = re.compile(r"(\d{8})_\d{3}\.png")
# A file whose rows mostly fail is the wrong file, not a file with a few bad rows.
MAX_BAD_SHARE = 0.5
# Below this many images an all-negative file is plausible (22% of SIIM images are positive:
# 20 negatives in a row happen 0.7% of the time).
ALL_NEGATIVE_MIN_IMAGES = 20


@dataclass(frozen=True, kw_only=True)
class SiimLabel:
    """The label rows of one SIIM image.

    Attributes:
        image_id: the SOPInstanceUID.
        rles: the non-empty RLE strings (one per instance), stripped, in file order. OR
            them with :func:`pneumo.ingest.rle.combine_masks`: instances may overlap.
        rows: 1-based CSV line numbers of this image's rows, for error messages.
    """

    image_id: str
    rles: tuple[str, ...]
    rows: tuple[int, ...]

    @property
    def has_ptx(self) -> bool:
        """True when the image has at least one pneumothorax instance."""
        return bool(self.rles)


@dataclass(frozen=True, kw_only=True)
class LabelProblem:
    """A label row that was not used, and why.

    Attributes:
        source: ``"file:line"`` (1-based line).
        reason: what is wrong, in a few words.
        image_id: the image the row is about, when it names one: that image is left out.
    """

    source: str
    reason: str
    image_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class NihEntry:
    """One row of NIH's Data_Entry_2017 (original or v2020).

    Attributes:
        image_index: the PNG name, e.g. ``"00000001_000.png"``.
        findings: the findings in file order; ``()`` for "No Finding".
        patient_id: 8-digit zero-padded (the 2017 file writes ``00000001``, v2020 ``1``).
        follow_up: the follow-up number, or None if unreadable.
        age_years: None when missing, unparseable or over 120 (the 2017 file has 16 ages
            of 148-414: data errors).
        sex: ``"M"``, ``"F"`` or None.
        view_position: ``"PA"``, ``"AP"`` or None.
    """

    image_index: str
    findings: tuple[str, ...]
    patient_id: str
    follow_up: int | None
    age_years: float | None
    sex: str | None
    view_position: str | None

    @property
    def has_ptx(self) -> bool:
        """True when NIH's text-mined labels include Pneumothorax."""
        return "Pneumothorax" in self.findings


@dataclass(frozen=True, kw_only=True)
class Box:
    """A bounding box of BBox_List_2017.csv, in pixels of the 1024x1024 image.

    ``label`` is kept as the file spells it: "Infiltrate", where Data_Entry says
    "Infiltration".
    """

    label: str
    x: float
    y: float
    w: float
    h: float


def read_siim_labels(path: Path) -> tuple[dict[str, SiimLabel], list[LabelProblem]]:
    """Read a SIIM-ACR RLE label CSV, any variant (see the module docstring).

    ``-1`` (or an empty cell) is a negative row. An image may have several rows, one per
    instance. Malformed RLE strings (non-integers, odd count, zero-length run) are caught
    here; a run past the end of the image needs the image size and is caught later by
    :func:`pneumo.ingest.rle.combine_masks`.

    Returns:
        The labels by image id (images with a bad row left out), and the problems.

    Raises:
        BadInput: the file cannot be read, or has a header without ImageId/EncodedPixels.
    """
    rles: dict[str, list[str]] = {}
    lines: dict[str, list[int]] = {}
    negative: set[str] = set()
    problems: list[LabelProblem] = []
    for line, image_id, rle in _siim_rows(path, problems):
        rles.setdefault(image_id, [])
        lines.setdefault(image_id, []).append(line)
        if rle in ("", EMPTY):
            negative.add(image_id)
        elif _RLE_PAIRS.fullmatch(rle):
            rles[image_id].append(rle)
        else:
            source = f"{path.name}:{line}"
            problems.append(
                LabelProblem(source=source, reason=_rle_problem(rle), image_id=image_id)
            )
    mixed = sum(1 for image_id in negative if rles[image_id])
    if mixed:
        log.warning("%s: %d images have both -1 and mask rows; keeping the masks", path, mixed)
    bad = {p.image_id for p in problems}
    labels = {
        image_id: SiimLabel(image_id=image_id, rles=tuple(found), rows=tuple(lines[image_id]))
        for image_id, found in rles.items()
        if image_id not in bad
    }
    log.info(
        "%s: %d images (%d positive), %d problems",
        path,
        len(labels),
        sum(label.has_ptx for label in labels.values()),
        len(problems),
    )
    return labels, problems


def check_label_rows(path: Path, good_rows: int, problems: list[LabelProblem], what: str) -> None:
    """Refuse a label file before anything is written when its rows mostly fail.

    Raises:
        BadInput: no usable row, or more than half of the rows are bad.
    """
    total = good_rows + len(problems)
    if good_rows and len(problems) <= MAX_BAD_SHARE * total:
        return
    example = f" (line {problems[0].source}: {problems[0].reason})" if problems else ""
    raise BadInput(
        f"{path}: {len(problems)} of {total} rows are not {what} rows{example}: "
        "is it the right label file?"
    )


def check_siim_labels(
    path: Path, labels: dict[str, SiimLabel], problems: list[LabelProblem]
) -> None:
    """Refuse a file that is not SIIM labels; warn about an all-negative one (a sample
    submission is all ``-1``: used as labels it would call every image negative).

    Raises:
        BadInput: no usable ``ImageId, EncodedPixels`` row, or more than half bad.
    """
    good = sum(len(label.rows) for label in labels.values())
    check_label_rows(path, good, problems, "ImageId,EncodedPixels")
    if len(labels) >= ALL_NEGATIVE_MIN_IMAGES and not any(x.has_ptx for x in labels.values()):
        log.warning(
            "%s: all %d images are labelled -1 (no pneumothorax), where real SIIM labels are "
            "about 22%% positive; a sample submission looks like this. If it is not a label "
            "file, undo the batch: pneumo batch drop DATASET BATCH",
            path,
            len(labels),
        )


def siim_labels_sha256(label: SiimLabel | None) -> str | None:
    """A hash of an image's labels, whatever their row order (None: unlabelled)."""
    if label is None:
        return None
    return hashlib.sha256("\n".join(sorted(label.rles) or ["-1"]).encode()).hexdigest()


def nih_labels_sha256(entry: NihEntry) -> str:
    """A hash of an NIH image's findings, whatever their order."""
    return hashlib.sha256("|".join(sorted(entry.findings) or [_NO_FINDING]).encode()).hexdigest()


def _siim_rows(path: Path, problems: list[LabelProblem]) -> Iterator[tuple[int, str, str]]:
    """Yield (line, image_id, stripped rle) per well-formed row; record the others."""
    reader = csv.reader(StringIO(_read_text(path)))
    first = True
    for row in reader:
        line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        cells = [cell.strip() for cell in row]
        if first:
            first = False
            if cells[0] == _SIIM_COLUMNS[0]:  # a header; the sample file has none
                if tuple(cells) != _SIIM_COLUMNS:
                    raise BadInput(f"{path}: header {cells}, expected {list(_SIIM_COLUMNS)}")
                continue
        image_id = cells[0]
        if len(cells) != 2 or not image_id:
            reason = f"expected 2 columns (ImageId, EncodedPixels), found {len(cells)}"
            if not image_id:
                reason = "empty ImageId"
            source = f"{path.name}:{line}"
            problems.append(LabelProblem(source=source, reason=reason, image_id=image_id or None))
            continue
        yield line, image_id, cells[1]


def _rle_problem(rle: str) -> str:
    """Say why a string is not a list of RLE pairs (only called for bad strings)."""
    values = rle.split()
    if not all(v.isdigit() for v in values):
        return "RLE is not a list of non-negative integers"
    if len(values) % 2:
        return f"RLE has an odd number of values ({len(values)}): expected gap/length pairs"
    return "RLE has a run of length 0"


def read_nih_entries(path: Path) -> tuple[dict[str, NihEntry], list[LabelProblem]]:
    """Read NIH's Data_Entry_2017.csv (2017 original or v2020), plain or gzip.

    Ages keep their units (``058Y``, ``011M``, ``001D``, or bare ``58``). A row that is
    short, has no image name, a patient id that is not a number or does not match the
    image name's prefix, or repeats an image name, becomes a problem.

    Raises:
        BadInput: the file cannot be read or its header is not Data_Entry's.
    """
    reader = csv.reader(StringIO(_read_text(path)))
    header = [cell.strip() for cell in next(reader, [])]
    if tuple(header[: len(_NIH_COLUMNS)]) != _NIH_COLUMNS:
        raise BadInput(f"{path}: header starts {header[:7]}, expected {list(_NIH_COLUMNS)}")
    entries: dict[str, NihEntry] = {}
    problems: list[LabelProblem] = []
    too_old = 0
    for row in reader:
        if not row:
            continue
        entry = _nih_entry(row)
        if isinstance(entry, NihEntry) and entry.image_index not in entries:
            entries[entry.image_index] = entry
            too_old += entry.age_years is None and _age(row[4].strip()) is not None
            continue
        reason = entry if isinstance(entry, str) else "repeated Image Index"
        source = f"{path.name}:{reader.line_num}"
        problems.append(LabelProblem(source=source, reason=reason, image_id=row[0].strip() or None))
    for bad in {p.image_id for p in problems}:
        entries.pop(bad or "", None)  # an image with a bad or repeated row: trust none of it
    if too_old:
        log.warning("%s: %d ages over %g years set to None", path, too_old, MAX_AGE_YEARS)
    log.info("%s: %d entries, %d problems", path, len(entries), len(problems))
    return entries, problems


def _nih_entry(row: list[str]) -> NihEntry | str:
    """Parse one Data_Entry row into an entry, or say why it is bad."""
    if len(row) < len(_NIH_COLUMNS):
        return f"expected at least {len(_NIH_COLUMNS)} columns, found {len(row)}"
    image, findings, follow_up, patient, age, sex, view = [cell.strip() for cell in row[:7]]
    if not image:
        return "empty Image Index"
    if not patient.isdigit():
        return "Patient ID is not a number"
    patient_id = patient.zfill(8)
    match = _NIH_IMAGE.fullmatch(image)
    if match is not None and match[1] != patient_id:
        return "Patient ID differs from the image name's prefix"
    if not findings:
        return "empty Finding Labels"
    years = _age(age)
    return NihEntry(
        image_index=image,
        findings=_findings(findings),
        patient_id=patient_id,
        follow_up=int(follow_up) if follow_up.isdigit() else None,
        age_years=years if years is not None and years <= MAX_AGE_YEARS else None,
        sex=sex.upper() if sex.upper() in ("M", "F") else None,
        view_position=view.upper() or None,
    )


# A few hundred distinct values over 112,120 rows: parse each once.
@lru_cache(maxsize=4096)
def _age(text: str) -> float | None:
    return parse_age(text, max_years=None)


@lru_cache(maxsize=4096)
def _findings(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split("|") if f.strip() != _NO_FINDING)


def read_nih_bboxes(path: Path) -> dict[str, list[Box]]:
    """Read BBox_List_2017.csv: image name -> its boxes, in file order.

    The header (``Image Index,Finding Label,Bbox [x,y,w,h],,,``) has trailing empty columns;
    extra empty cells on data rows are ignored.

    Raises:
        BadInput: the file cannot be read, or a row is not name, label and four numbers.
    """
    reader = csv.reader(StringIO(_read_text(path)))
    boxes: dict[str, list[Box]] = {}
    for row in reader:
        cells = [cell.strip() for cell in row]
        while cells and not cells[-1]:
            cells.pop()
        if not cells or (reader.line_num == 1 and cells[0] == "Image Index"):
            continue
        try:
            name, label, x, y, w, h = cells
            box = Box(label=label, x=float(x), y=float(y), w=float(w), h=float(h))
        except ValueError as e:
            raise BadInput(f"{path}:{reader.line_num}: not name,label,x,y,w,h ({e})") from e
        boxes.setdefault(name, []).append(box)
    return boxes


def read_split_list(path: Path) -> set[str]:
    """Read an NIH split list (train_val_list.txt, test_list.txt): one image name per line."""
    return {line.strip() for line in _read_text(path).splitlines() if line.strip()}


def nih_list_patients(path: Path) -> set[str]:
    """The NIH patient ids (8 digits) of a split list's image names.

    Raises:
        BadInput: a line is not an NIH image name (``NNNNNNNN_NNN.png``).
    """
    out = set()
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        match = _NIH_IMAGE.fullmatch(name)
        if match is None:
            raise BadInput(f"{path}:{number}: {name[:40]!r} is not an NIH image name")
        out.add(match[1])
    return out


def read_nih_xref(path: Path) -> dict[str, str]:
    """Read siim_to_nih_id.csv: SIIM ImageId (``Kaggle_ID``) -> NIH patient id.

    The NIH patient id is the 8-digit prefix of ``NIH_ID`` (``00016587_003.png``). The
    mapping comes from a third party: a strong hint, not ground truth.

    Raises:
        BadInput: the file cannot be read, lacks the two columns, or a name is malformed.
    """
    reader = csv.DictReader(StringIO(_read_text(path)))
    names = [name.strip() for name in reader.fieldnames or ()]
    if names[:2] != ["Kaggle_ID", "NIH_ID"]:
        raise BadInput(f"{path}: header {names}, expected ['Kaggle_ID', 'NIH_ID']")
    reader.fieldnames = names
    xref: dict[str, str] = {}
    for row in reader:
        match = _NIH_IMAGE.fullmatch((row["NIH_ID"] or "").strip())
        kaggle_id = (row["Kaggle_ID"] or "").strip()
        if match is None or not kaggle_id:
            raise BadInput(f"{path}:{reader.line_num}: expected <SIIM id>,<NNNNNNNN_NNN.png>")
        xref[kaggle_id] = match[1]
    return xref


def _read_text(path: Path) -> str:
    """The text of a plain or gzip file (by magic bytes), BOM removed."""
    try:
        data = Path(path).read_bytes()
        if data.startswith(_GZIP_MAGIC):
            data = gzip.decompress(data)
        return data.decode("utf-8-sig")
    except OSError as e:  # also gzip.BadGzipFile
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from e
    except EOFError as e:
        raise BadInput(f"{path}: the gzip stream is cut off") from e
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text (byte {e.start})") from e
