"""A unit of ingest work: a fixed run of input files, processed by one worker process.

A batch's sorted input files are cut into units of ``UNIT_FILES`` files. A worker takes
whole units: it decodes the files, dedupes them against the dataset, gives each sample its
patient key and split, and writes one tar *piece* per split/label group on local disk.
Only the manifest rows and the pieces' paths travel back; the parent concatenates pieces
into the final shards in unit order (a copy in the kernel). So the parent does almost no
work per sample, workers scale, and the shard bytes are the same whatever ``--workers``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shards import layout, manifest
from shards.tario import Piece, ShardWriter

log = logging.getLogger(__name__)

UNIT_FILES = 128  # small enough to share 1,000 files among 8 workers, big enough to be cheap


@dataclass(kw_only=True)
class Sample:
    """A processed input, ready for a shard: its files and its manifest row."""

    key: str
    image_id: str
    members: dict[str, bytes]  # {"jpg" | "png": ..., "mask.png": ..., }
    meta: dict[str, Any]  # the sample's JSON, also the base of its manifest row
    raw_patient: tuple[str, str]  # (namespace, id) for the keyed hash; never stored
    # Official split lists: "test", or "trainval" (train or val by patient hash, never test).
    forced_split: str | None = None


@dataclass(frozen=True)
class Rejected:
    source: str
    reason: str
    image_id: str | None = None  # when the file was readable enough to tell


@dataclass(frozen=True, kw_only=True)
class UnitContext:
    """Everything a worker needs to write units, inherited once through fork."""

    scratch: str  # local folder for the pieces
    dataset: str
    batch: str
    fractions: tuple[float, float, float]
    secret: str
    seen_ids: frozenset[str]  # already in the dataset
    seen_content: frozenset[str]
    patient_split: dict[str, str]  # a patient keeps the split of their first image
    process: Callable[[Any, Any], Sample | Rejected]  # (format_ctx, source file)
    format_ctx: Any  # the format's label tables, read once in the parent
    counter: Any  # multiprocessing.Value: files done, for the parent's progress bar


@dataclass(kw_only=True)
class UnitResult:
    """What a unit gives back. Each row's ``shard`` holds its (split, group) until the
    parent knows which final shard the piece went into."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    pieces: dict[tuple[str, str], Piece] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)
    came: list[str] = field(default_factory=list)  # image ids seen, stored or not
    skipped: int = 0


def patient_key(secret: str, namespace: str, raw_id: str) -> str:
    """Keyed hash (HMAC-SHA256) of a patient id: linkable within pneumo, not reversible."""
    msg = f"{namespace}:{raw_id.strip()}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()[:20]


def split_of(patient: str, fractions: Sequence[float]) -> str:
    """Patient-level split: a fixed function of ``patient_key``, the same in every batch."""
    u = int(hashlib.sha256(f"split:{patient}".encode()).hexdigest()[:12], 16) / 16**12
    if u < fractions[2]:
        return "test"
    if u < fractions[2] + fractions[1]:
        return "val"
    return "train"


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
        self.result = UnitResult()
        self.writers: dict[tuple[str, str], ShardWriter] = {}
        self.ids: set[str] = set()
        self.content: set[str] = set()
        self.patients: dict[str, str] = {}

    def take(self, item: Sample | Rejected) -> None:
        if item.image_id:
            self.result.came.append(item.image_id)
        if isinstance(item, Rejected):
            self.result.rejected.append(item)
            return
        sha = item.meta["content_sha256"]
        if (
            item.image_id in self.ids
            or item.image_id in self.ctx.seen_ids
            or sha in self.content
            or sha in self.ctx.seen_content
        ):
            self.result.skipped += 1
            return
        self.ids.add(item.image_id)
        self.content.add(sha)
        self._write(item)

    def _write(self, sample: Sample) -> None:
        patient = patient_key(self.ctx.secret, *sample.raw_patient)
        split = self._split(patient, sample)
        group = layout.label_group(sample.meta.get("has_ptx"))
        if (split, group) not in self.writers:
            name = f"unit{self.index:06d}-{split}-{group}"
            self.writers[(split, group)] = ShardWriter(name, self.ctx.scratch)
        meta = {**sample.meta, "patient_key": patient, "split": split, "dataset": self.ctx.dataset}
        self.writers[(split, group)].write(
            {"__key__": sample.key, **sample.members, "json": json_bytes(meta)}
        )
        row = {k: meta.get(k) for k in manifest.SAMPLES_SCHEMA.names}
        row.update(
            key=sample.key, image_id=sample.image_id, batch=self.ctx.batch, shard=(split, group)
        )
        self.result.rows.append(row)

    def _split(self, patient: str, sample: Sample) -> str:
        known = self.ctx.patient_split.get(patient) or self.patients.get(patient)
        fractions = self.ctx.fractions
        if sample.forced_split == "test":
            fractions = (0.0, 0.0, 1.0)
        elif sample.forced_split == "trainval":
            train, val, _ = fractions
            fractions = (train / (train + val), val / (train + val), 0.0)
        wanted = split_of(patient, fractions)
        if known is not None and known != wanted and sample.forced_split:
            log.warning(
                "%s: the split list says %s, but its patient is already in %s; kept %s",
                sample.image_id,
                sample.forced_split,
                known,
                known,
            )
        split = known or wanted
        self.patients[patient] = split
        return split

    def finish(self) -> UnitResult:
        self.result.pieces = {slot: w.close() for slot, w in sorted(self.writers.items())}
        return self.result


def json_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
