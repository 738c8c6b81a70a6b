"""A unit of ingest work: a fixed run of input files, processed by one worker process.

A batch's sorted input files are cut into units of ``UNIT_FILES`` files. A worker takes
whole units: it decodes the files, dedupes them against the dataset and the unit, gives
each sample its patient key and split, and writes one tar *piece* per split/label group on
local disk. Only the manifest rows and the pieces' paths travel back; the parent drops
what an earlier unit already gave (see ``pneumo.ingest.batch``) and concatenates the pieces into
the final shards in unit order. So the parent does almost no work per sample, workers
scale, and the shard bytes are the same whatever ``--workers``.

Nothing a unit decides depends on the other units: the split is the dataset's policy
applied to the patient key (decided in the parent before any unit runs), and a patient
already committed keeps the split it has.

A 16-bit image is stored as ``KEY.npy.gz``, whatever a source made of it (a DICOM decoded
to a 16-bit PNG, an NIH-style 16-bit PNG): webdataset's standard image decoders would clip
a 16-bit PNG to solid white (see ``pneumo.shards.members``). Its ``content_sha256`` is the
hash of those bytes, the member the stream and ``pneumo verify`` hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from pneumo.ingest.patients import Patient, PatientSecret, SplitPolicy
from pneumo.shards import layout, manifest
from pneumo.shards.members import ARRAY_FORMAT, ARRAY_SUFFIX, encode_array
from pneumo.shards.tario import Piece, ShardWriter

log = logging.getLogger(__name__)

UNIT_FILES = 128  # small enough to share 1,000 files among 8 workers, big enough to be cheap


@dataclass(kw_only=True)
class Sample:
    """A processed input, ready for a shard: its files and its manifest row."""

    key: str
    image_id: str
    members: dict[str, bytes]  # {"jpg" | "png" | "npy.gz": ..., "mask.png": ..., }
    meta: dict[str, Any]  # the sample's JSON, also the base of its manifest row
    patient: Patient  # hashed with the secret; never stored
    labels_sha256: str | None = None  # of the label rows used; None: unlabelled


@dataclass(frozen=True)
class Rejected:
    source: str
    reason: str
    image_id: str | None = None  # when the file was readable enough to tell


@dataclass(frozen=True)
class Stored:
    """What the dataset already holds for an image id (its latest labels)."""

    labels_sha256: str | None
    labels_version: int


@dataclass(frozen=True, kw_only=True)
class UnitContext:
    """Everything a worker needs to write units, inherited once through fork."""

    scratch: str  # local folder for the pieces
    dataset: str
    batch: str
    policy: SplitPolicy  # this batch's: the dataset's policy and the batch's own lists
    secret: PatientSecret
    relabel: bool  # store images whose labels changed as a new labels version
    stored: Mapping[str, Stored]  # image ids already in the dataset
    stored_content: frozenset[str]  # content_sha256 already in the dataset
    committed: Mapping[str, str]  # patient_key -> split of the committed rows
    process: Callable[[Any, Any], Sample | Rejected]  # (format_ctx, source file)
    format_ctx: Any  # the format's label tables, read once in the parent
    counter: Any  # multiprocessing.Value: files done, for the parent's progress bar


@dataclass(kw_only=True)
class UnitResult:
    """What a unit gives back. Each row's ``shard`` holds its (split, group) until the
    parent knows which final shard the piece went into."""

    index: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    pieces: dict[tuple[str, str], Piece] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)
    came: list[str] = field(default_factory=list)  # image ids seen, stored or not
    skipped: int = 0  # already in the dataset
    duplicates: int = 0  # given twice in this batch (same id, or same bytes)
    label_changes: int = 0  # skipped images whose labels differ from the stored ones
    moved: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (kept, policy)


_ctx: UnitContext | None = None


def init_worker(ctx: UnitContext) -> None:
    global _ctx
    _ctx = ctx


def run_unit(unit: tuple[int, Sequence[Any]]) -> UnitResult:
    """Process one unit's files into pieces; returns their manifest rows."""
    if _ctx is None:
        raise RuntimeError("init_worker was not called in this process")
    index, files = unit
    writer = _UnitWriter(_ctx, index)
    for src in files:
        writer.take(_ctx.process(_ctx.format_ctx, src))
        with _ctx.counter.get_lock():
            _ctx.counter.value += 1
    return writer.finish()


class _UnitWriter:
    def __init__(self, ctx: UnitContext, index: int) -> None:
        self.ctx, self.index = ctx, index
        self.result = UnitResult(index=index)
        self.writers: dict[tuple[str, str], ShardWriter] = {}
        self.ids: set[str] = set()
        self.content: set[str] = set()
        self.keys: dict[str, str] = {}  # sample key -> image id

    def take(self, item: Sample | Rejected) -> None:
        if item.image_id:
            self.result.came.append(item.image_id)
        if isinstance(item, Sample):
            item = stored_form(item)
        if isinstance(item, Rejected):
            self.result.rejected.append(item)
            return
        version = self._labels_version(item)
        if version is None:
            return
        if item.key in self.keys:  # two ids, one key ("1.2" and "1_2"): keep the first
            self.result.rejected.append(_key_clash(item, self.keys[item.key]))
            return
        self.ids.add(item.image_id)
        self.content.add(item.meta["content_sha256"])
        self.keys[item.key] = item.image_id
        self._write(item, version)

    def _labels_version(self, item: Sample) -> int | None:
        """The labels version to store the sample under, or None to skip it."""
        sha = item.meta["content_sha256"]
        if item.image_id in self.ids or sha in self.content:
            self.result.duplicates += 1
            return None
        stored = self.ctx.stored.get(item.image_id)
        if stored is None:
            if sha in self.ctx.stored_content:  # the same pixels under another id
                self.result.skipped += 1
                return None
            return 1
        changed = item.labels_sha256 is not None and item.labels_sha256 != stored.labels_sha256
        if changed and self.ctx.relabel:
            return stored.labels_version + 1
        self.result.skipped += 1
        self.result.label_changes += changed
        return None

    def _write(self, sample: Sample, version: int) -> None:
        patient = self.ctx.secret.key(sample.patient)
        split = self._split(patient)
        group = layout.label_group(sample.meta.get("has_ptx"))
        if (split, group) not in self.writers:
            name = f"unit{self.index:06d}-{split}-{group}"
            self.writers[(split, group)] = ShardWriter(name, self.ctx.scratch)
        meta = {
            **sample.meta,
            "patient_key": patient,
            "patient_basis": sample.patient.basis,
            "split": split,
            "dataset": self.ctx.dataset,
            "labels_version": version,
            "labels_sha256": sample.labels_sha256,
        }
        self.writers[(split, group)].write(
            {"__key__": sample.key, **sample.members, "json": json_bytes(meta)}
        )
        row = {k: meta.get(k) for k in manifest.SAMPLES_SCHEMA.names}
        row.update(
            key=sample.key, image_id=sample.image_id, batch=self.ctx.batch, shard=(split, group)
        )
        self.result.rows.append(row)

    def _split(self, patient: str) -> str:
        """The policy's split, unless the patient is committed elsewhere: then that one,
        reported (committed rows are never rewritten)."""
        wanted = self.ctx.policy.split(patient)
        committed = self.ctx.committed.get(patient)
        if committed is None:
            return wanted
        if committed != wanted:
            self.result.moved[patient] = (committed, wanted)
        return committed

    def finish(self) -> UnitResult:
        self.result.pieces = {slot: w.close() for slot, w in sorted(self.writers.items())}
        return self.result


def without(piece: Piece, keys: set[str], scratch: str) -> Piece | None:
    """The piece minus the samples of ``keys``; None if nothing is left.

    How the parent drops an image that an earlier unit already gave. It is rare, so a piece
    is rewritten only then, through the same writer: the samples kept have the bytes they
    would have had without the repeat.
    """
    writer = ShardWriter("filtered", scratch)
    sample: dict[str, Any] = {}
    with tarfile.open(piece.tmp_path) as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            if key in keys:
                continue
            if sample and sample["__key__"] != key:
                writer.write(sample)
                sample = {}
            sample["__key__"] = key
            sample[suffix] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if sample:
        writer.write(sample)
    os.unlink(piece.tmp_path)
    out = writer.close()
    if out.count:
        return out
    os.unlink(out.tmp_path)
    return None


def stored_form(sample: Sample) -> Sample | Rejected:
    """``sample`` as a shard stores it: a 16-bit PNG image becomes ``KEY.npy.gz`` with the
    same values (``image_format`` ``npy``, ``content_sha256`` of the new bytes); anything
    else is kept as it is. A 16-bit PNG that does not decode to one 16-bit channel is
    rejected: no reader could use it."""
    png = sample.members.get("png")
    if png is None or sample.meta.get("bit_depth") != 16:
        return sample
    pixels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.ndim != 2 or pixels.dtype != np.uint16:
        got = "nothing" if pixels is None else f"{pixels.dtype} {pixels.shape}"
        return Rejected(
            f"image {sample.image_id}",
            f"its 16-bit PNG decodes to {got}, not one 16-bit channel",
            sample.image_id,
        )
    data = encode_array(pixels)
    members = {k: v for k, v in sample.members.items() if k != "png"}
    meta = {
        **sample.meta,
        "image_format": ARRAY_FORMAT,
        "content_sha256": hashlib.sha256(data).hexdigest(),
    }
    return dataclasses.replace(sample, members={ARRAY_SUFFIX: data, **members}, meta=meta)


def _key_clash(item: Sample, other: str) -> Rejected:
    return Rejected(
        f"image {item.image_id}",
        f"its sample key {item.key} is already used by image {other}",
        item.image_id,
    )


def json_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
