"""``pneumo ingest nih``: ChestX-ray14 PNGs + ``Data_Entry_2017.csv`` -> one batch of shards.

The same flow as SIIM: list the PNGs (any folder depth), read and check the label tables,
open the batch (its split policy decided before any file is read), check each PNG on
``--workers`` processes (stored as it is when it is already 8/16-bit grey, else its first
channel re-encoded); ``pneumo.ingest.units`` dedupes, splits and writes the shards.

The official lists (``train_val_list.txt``, ``test_list.txt``) put every patient with an
image listed for test in test, SIIM images of that patient included (``pneumo.ingest.patients``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pneumo.ingest.batch import BatchConfig, BatchSummary, Progress
from pneumo.ingest.identity import SplitLists, open_batch
from pneumo.ingest.labels import (
    Box,
    LabelProblem,
    NihEntry,
    check_label_rows,
    nih_labels_sha256,
    nih_list_patients,
    read_nih_bboxes,
    read_nih_entries,
)
from pneumo.ingest.patients import nih_patient
from pneumo.ingest.sources import SourceFile, list_sources, read_input, take_part
from pneumo.ingest.units import Rejected, Sample
from pneumo.shards import layout
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import open_store

log = logging.getLogger(__name__)

DATASET = "nih"
# "00000001_000.png", also inside longer names ("00000001_000_512px.png" in derived copies).
_INDEX = re.compile(r"(\d{8}_\d{3})")


@dataclass(frozen=True, kw_only=True)
class NihConfig:
    image_root: str  # folder or s3:// prefix, searched recursively for *.png
    labels: Path  # Data_Entry_2017.csv (2017 or v2020 variant, .csv or .csv.gz)
    bbox: Path | None = None  # BBox_List_2017.csv
    train_val_list: Path | None = None  # official split lists: test_list.txt -> "test"
    test_list: Path | None = None
    batch: BatchConfig

    def __post_init__(self) -> None:
        if (self.train_val_list is None) != (self.test_list is None):
            raise ConfigError("--split-lists takes both files: train_val_list.txt test_list.txt")


@dataclass(frozen=True)
class _Context:
    entries: dict[str, NihEntry]
    bad_rows: dict[str, LabelProblem]
    boxes: dict[str, list[Box]]


def ingest_nih(cfg: NihConfig, progress: Progress | None = None) -> BatchSummary:
    """Ingest one batch of NIH ChestX-ray14 PNGs. See the module docstring for the flow."""
    files, _ = take_part(list_sources(cfg.image_root, [".png"]), cfg.batch.part)
    if not files:
        raise ConfigError(f"no .png files under {cfg.image_root}")
    entries, problems = read_nih_entries(cfg.labels)
    check_label_rows(cfg.labels, len(entries), problems, "Data_Entry")
    ctx = _Context(
        entries=entries,
        bad_rows={p.image_id: p for p in problems if p.image_id},
        boxes=read_nih_bboxes(cfg.bbox) if cfg.bbox else {},
    )
    lists = SplitLists()
    if cfg.train_val_list is not None and cfg.test_list is not None:
        test = frozenset(nih_patient(p) for p in nih_list_patients(cfg.test_list))
        lists = SplitLists(test=test, official=True, files=(cfg.train_val_list, cfg.test_list))
    store = open_store(cfg.batch.out)
    opened = open_batch(
        store,
        cfg.batch,
        DATASET,
        files=files,
        inputs=[cfg.labels, cfg.bbox, cfg.train_val_list, cfg.test_list],
        lists=lists,
    )
    if isinstance(opened, BatchSummary):
        return opened
    for p in problems:  # a bad row with a known image id is reported with its image
        if p.image_id is None:
            opened.reject(p.source, p.reason)
    opened.process(files, _process, ctx, progress)
    return opened.commit()


def _process(ctx: _Context, src: SourceFile) -> Sample | Rejected:
    found = _INDEX.search(Path(src.rel).name)
    if not found:
        return Rejected(src.name, "file name has no NIH image index (NNNNNNNN_NNN)")
    index = found.group(1) + ".png"
    entry = ctx.entries.get(index)
    if entry is None:
        problem = ctx.bad_rows.get(index)
        reason = (
            f"{problem.source}: {problem.reason}"
            if problem
            else (f"no row for {index} in Data_Entry")
        )
        return Rejected(src.name, reason, index)
    # Only bad content is quarantined: a file the store fails to give raises (StoreError),
    # which stops the batch for a rerun to resume (see read_input).
    raw = read_input(src)
    try:
        data, rows, cols, bit_depth = stored_png(raw)
    except ValueError as e:
        return Rejected(src.name, str(e), index)
    return _sample(ctx, index, entry, data, rows, cols, bit_depth)


def _sample(
    ctx: _Context, index: str, entry: NihEntry, data: bytes, rows: int, cols: int, bit_depth: int
) -> Sample:
    boxes = ctx.boxes.get(index, [])
    meta = {
        "image_id": index,
        "has_ptx": entry.has_ptx,
        "n_instances": None,
        "mask_area_px": None,
        "rows": rows,
        "cols": cols,
        "view_position": entry.view_position,
        "sex": entry.sex,
        "age_years": entry.age_years,
        "content_sha256": hashlib.sha256(data).hexdigest(),
        "image_format": "png",
        "bit_depth": bit_depth,
        "transfer_syntax": "png",
        "findings": list(entry.findings),
        "follow_up": entry.follow_up,
        "n_boxes": len(boxes),
        "boxes": [{"label": b.label, "x": b.x, "y": b.y, "w": b.w, "h": b.h} for b in boxes],
    }
    return Sample(
        key=layout.sample_key(index.removesuffix(".png")),
        image_id=index,
        members={"png": data},
        meta=meta,
        patient=nih_patient(entry.patient_id),
        labels_sha256=nih_labels_sha256(entry),
    )


def stored_png(data: bytes) -> tuple[bytes, int, int, int]:
    """The PNG bytes to store, its rows, cols and bit depth.

    An 8- or 16-bit grey PNG is stored exactly as it came; anything else (RGB, RGBA,
    palette: a few ChestX-ray14 files) keeps its first channel, re-encoded as grey PNG.

    Raises:
        ValueError: empty, not a PNG, truncated (no IEND chunk), or a header Pillow
            cannot read: bad content, for the quarantine.
    """
    if not data:
        raise ValueError("file is empty")
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG file")
    if b"IEND" not in data[-12:]:
        raise ValueError("truncated PNG (no IEND chunk)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))  # reads the header only
    except (OSError, SyntaxError) as e:  # Pillow's errors for a broken stream: bad content
        raise ValueError(f"cannot read PNG header ({type(e).__name__})") from e
    cols, rows = img.size
    if img.mode == "L":
        return data, rows, cols, 8
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return data, rows, cols, 16
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"cannot decode PNG (mode {img.mode})")
    first = arr if arr.ndim == 2 else arr[..., 2 if arr.shape[-1] >= 3 else 0]  # BGR(A): R first
    log.debug("PNG of mode %s: keeping its first channel", img.mode)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(first))
    if not ok:
        raise ValueError("cannot re-encode PNG")
    return buf.tobytes(), rows, cols, 16 if first.dtype == np.uint16 else 8
