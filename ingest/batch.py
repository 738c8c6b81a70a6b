"""One ingest run = one batch: samples in, shards + quarantine + manifest part out.

The order of writes is what makes a batch safe to kill at any moment (SIGKILL included):

1. shards, each uploaded whole (atomic put) under ``shards/<dataset>/<batch>/``;
2. the quarantine part;
3. the manifest part, last, in one atomic put: this is the commit.

Nothing reads a shard that no committed manifest names, so a killed run leaves nothing
visible. Running the same command again finds the batch uncommitted, deletes its leftover
shards and writes it again from the start: same input, same bytes, no duplicates.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards import layout, manifest
from shards.errors import ConfigError
from shards.store import Store
from shards.tario import ShardUploader, ShardWriter

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
# A public default keeps the demo working out of the box; production sets its own secret.
DEFAULT_PATIENT_SECRET = "pneumo-public-default-key"  # noqa: S105 - documented, not a credential

Progress = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """What every ingest run shares, whatever the source format."""

    out: str  # DATASET: folder or s3://bucket/prefix
    batch: str | None = None  # None: derived from the inputs, so a re-run finds its batch
    workers: int = 1
    shard_max_samples: int = 1000
    shard_max_bytes: int = 512 * 1024 * 1024
    split_fractions: tuple[float, float, float] | None = None  # None: the dataset's, or default
    patient_secret: str = DEFAULT_PATIENT_SECRET

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.shard_max_samples < 1:
            raise ConfigError("--shard-size must be at least 1")
        if self.batch is not None:
            layout.check_name("batch", self.batch)
        if self.split_fractions is not None:
            check_fractions(self.split_fractions)


def check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"split fractions {fractions}: need 3 non-negative numbers summing to 1")


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


@dataclass(kw_only=True)
class BatchSummary:
    dataset: str
    batch: str
    ingested: int = 0
    skipped: int = 0
    quarantined: int = 0
    orphan_labels: int = 0  # of the quarantined: label rows whose image never came
    shards: int = 0
    committed: bool = False
    already_committed: bool = False
    splits: dict[str, int] = field(default_factory=dict)


def patient_key(secret: str, namespace: str, raw_id: str) -> str:
    """Keyed hash (HMAC-SHA256) of a patient id: linkable within pneumo, not reversible."""
    msg = f"{namespace}:{raw_id.strip()}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()[:20]


def split_of(patient: str, fractions: tuple[float, float, float]) -> str:
    """Patient-level split: a fixed function of ``patient_key``, the same in every batch."""
    u = int(hashlib.sha256(f"split:{patient}".encode()).hexdigest()[:12], 16) / 16**12
    if u < fractions[2]:
        return "test"
    if u < fractions[2] + fractions[1]:
        return "val"
    return "train"


def input_fingerprint(files: Iterable[Any], *label_files: Path | None) -> str:
    """A hash of a batch's inputs (file names and sizes, label file contents).

    It names the batch by default, so re-running the same command finds the same batch.
    """
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.rel}:{f.size}\n".encode())
    for path in label_files:
        if path is not None:
            h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()


def already_committed(
    store: Store, dataset: str, batch: str, inputs: str, n_files: int
) -> BatchSummary:
    """A committed batch is never written again; other inputs under its name are an error."""
    record = store.get(layout.batch_record(dataset, batch)) if store.exists(
        layout.batch_record(dataset, batch)) else None
    if record is not None and json.loads(record).get("inputs") != inputs:
        raise ConfigError(
            f"batch {batch!r} is already committed with other inputs; "
            "give the new files a new --batch name"
        )
    log.info("batch %s is already committed: nothing to add", batch)
    return BatchSummary(dataset=dataset, batch=batch, skipped=n_files, committed=True,
                        already_committed=True)


def resolve_fractions(store: Store, wanted: tuple[float, float, float] | None) -> tuple:
    """The dataset's split fractions, fixed by its first ingest so the test set never moves."""
    settings = manifest.read_settings(store)
    if settings is None:
        fractions = tuple(wanted or DEFAULT_FRACTIONS)
        manifest.write_settings(
            store, {"schema_version": layout.SCHEMA_VERSION, "split_fractions": list(fractions)}
        )
        return fractions
    stored = tuple(settings["split_fractions"])
    if wanted is not None and any(abs(a - b) > 1e-9 for a, b in zip(wanted, stored, strict=True)):
        raise ConfigError(
            f"this dataset's split fractions are fixed at {stored} by its first batch; "
            f"drop --split-fractions or use a new dataset"
        )
    return stored


class BatchWriter:
    """Dedupes samples, assigns splits, writes the shards and commits the batch."""

    def __init__(
        self, store: Store, cfg: BatchConfig, dataset: str, batch: str, *, inputs: str
    ) -> None:
        self.store, self.cfg, self.dataset, self.batch = store, cfg, dataset, batch
        self.inputs = inputs
        self.fractions = resolve_fractions(store, cfg.split_fractions)
        self.summary = BatchSummary(dataset=dataset, batch=batch)
        existing = manifest.read(
            store, columns=["image_id", "content_sha256", "patient_key", "split"]
        )
        self.seen_ids = set(existing.column("image_id").to_pylist())
        self.seen_content = set(existing.column("content_sha256").to_pylist())
        # A patient keeps the split of their first image, in every later batch too.
        self.patient_split = dict(
            zip(existing.column("patient_key").to_pylist(), existing.column("split").to_pylist(),
                strict=True)
        )
        self.rows: list[dict[str, Any]] = []
        self.rejected: list[Rejected] = []
        self.writers: dict[tuple[str, str], ShardWriter] = {}
        self.next_index: dict[tuple[str, str], int] = {}
        self.uploader = ShardUploader(store)
        self._discard_uncommitted_leftovers()
        scratch = store.scratch_dir()
        self.tmp = tempfile.mkdtemp(prefix=f"ingest-{batch}-", dir=scratch)

    def _discard_uncommitted_leftovers(self) -> None:
        leftovers = self.store.list(layout.batch_shard_prefix(self.dataset, self.batch))
        if leftovers:
            log.info("batch %s was interrupted: rewriting it (%d old shards)", self.batch,
                     len(leftovers))
        for path in leftovers:
            self.store.delete(path)
        scratch = self.store.scratch_dir()
        if scratch is not None:
            for old in scratch.glob(f"ingest-{self.batch}-*"):
                shutil.rmtree(old, ignore_errors=True)

    def reject(self, source: str, reason: str) -> None:
        self.rejected.append(Rejected(source, reason))
        log.debug("quarantined %s: %s", source, reason)

    def add(self, sample: Sample) -> None:
        sha = sample.meta["content_sha256"]
        if sample.image_id in self.seen_ids or sha in self.seen_content:
            self.summary.skipped += 1
            return
        self.seen_ids.add(sample.image_id)
        self.seen_content.add(sha)
        patient = patient_key(self.cfg.patient_secret, *sample.raw_patient)
        split = self._split(patient, sample)
        group = layout.label_group(sample.meta.get("has_ptx"))
        writer = self._writer(split, group)
        meta = {**sample.meta, "patient_key": patient, "split": split, "dataset": self.dataset}
        members = {"__key__": sample.key, **sample.members, "json": _json_bytes(meta)}
        writer.write(members)
        row = {k: meta.get(k) for k in manifest.SAMPLES_SCHEMA.names}
        row.update(key=sample.key, image_id=sample.image_id, batch=self.batch, shard=writer.path)
        self.rows.append(row)
        self.summary.ingested += 1
        self.summary.splits[split] = self.summary.splits.get(split, 0) + 1
        if writer.count >= self.cfg.shard_max_samples or writer.nbytes >= self.cfg.shard_max_bytes:
            self._finish(split, group)

    def _split(self, patient: str, sample: Sample) -> str:
        fractions = self.fractions
        if sample.forced_split == "test":
            fractions = (0.0, 0.0, 1.0)
        elif sample.forced_split == "trainval":
            train, val, _ = self.fractions
            fractions = (train / (train + val), val / (train + val), 0.0) if train + val else (
                1.0, 0.0, 0.0)
        wanted = split_of(patient, fractions)
        split = self.patient_split.setdefault(patient, wanted)
        if split != wanted and sample.forced_split:
            log.warning("%s: the split list says %s, but its patient is already in %s; kept %s",
                        sample.image_id, sample.forced_split, split, split)
        return split

    def _writer(self, split: str, group: str) -> ShardWriter:
        slot = (split, group)
        if slot not in self.writers:
            index = self.next_index.get(slot, 0)
            self.next_index[slot] = index + 1
            path = layout.shard_path(self.dataset, self.batch, split, group, index)
            self.writers[slot] = ShardWriter(path, self.tmp)
        return self.writers[slot]

    def _finish(self, split: str, group: str) -> None:
        self.uploader.submit(self.writers.pop((split, group)))
        self.summary.shards += 1

    def commit(self) -> BatchSummary:
        """Upload the last shards, then the quarantine part, then the manifest part."""
        for slot in sorted(self.writers):
            self._finish(*slot)
        try:
            self.uploader.wait()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        q_rows = [
            {"source": r.source, "reason": r.reason, "dataset": self.dataset, "batch": self.batch}
            for r in self.rejected
        ]
        q_path = layout.quarantine_part(self.dataset, self.batch)
        if q_rows:
            manifest.write_part(self.store, q_path, manifest.to_table(q_rows, "quarantine"))
        elif self.store.exists(q_path):  # a stale part from an interrupted earlier attempt
            self.store.delete(q_path)
        record = {"dataset": self.dataset, "batch": self.batch, "inputs": self.inputs,
                  "ingested": self.summary.ingested, "skipped": self.summary.skipped,
                  "quarantined": len(self.rejected), "shards": self.summary.shards}
        self.store.put(layout.batch_record(self.dataset, self.batch), _json_bytes(record))
        table = manifest.to_table(self.rows, "samples")
        manifest.write_part(self.store, layout.manifest_part(self.dataset, self.batch), table)
        self.summary.quarantined = len(self.rejected)
        self.summary.committed = True
        return self.summary


def _json_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def is_hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)
