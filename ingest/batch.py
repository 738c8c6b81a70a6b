"""One ingest run = one batch: samples in, shards + quarantine + manifest part out.

The input files are processed in units on ``--workers`` processes (see ``ingest.units``).
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
import json
import logging
import multiprocessing as mp
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.sources import run_ordered
from ingest.units import (
    UNIT_FILES,
    Rejected,
    Sample,
    UnitContext,
    UnitResult,
    init_worker,
    json_bytes,
    run_unit,
)
from shards import layout, manifest
from shards.errors import ConfigError, StoreError
from shards.store import Store
from shards.tario import Piece, ShardUploader, ShardWriter

log = logging.getLogger(__name__)

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
    try:
        record = json.loads(store.get(layout.batch_record(dataset, batch)))
    except StoreError:  # committed before batch records existed: nothing to compare
        record = {"inputs": inputs}
    if record.get("inputs") != inputs:
        raise ConfigError(
            f"batch {batch!r} is already committed with other inputs; "
            "give the new files a new --batch name"
        )
    log.info("batch %s is already committed: nothing to add", batch)
    return BatchSummary(
        dataset=dataset, batch=batch, skipped=n_files, committed=True, already_committed=True
    )


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


class BatchRun:
    """One batch being written: units of files on worker processes, then the commit."""

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
        self.seen_content = frozenset(existing.column("content_sha256").to_pylist())
        self.patient_split = dict(
            zip(
                existing.column("patient_key").to_pylist(),
                existing.column("split").to_pylist(),
                strict=True,
            )
        )
        self.rows: list[dict[str, Any]] = []
        self.rejected: list[Rejected] = []
        self._discard_uncommitted_leftovers()

    def _discard_uncommitted_leftovers(self) -> None:
        leftovers = self.store.list(layout.batch_shard_prefix(self.dataset, self.batch))
        if leftovers:
            log.info(
                "batch %s was interrupted: rewriting it (%d old shards)", self.batch, len(leftovers)
            )
        for path in leftovers:
            self.store.delete(path)
        scratch = self.store.scratch_dir()
        if scratch is not None:
            for old in scratch.glob(f"ingest-{self.batch}-*"):
                shutil.rmtree(old, ignore_errors=True)

    def reject(self, source: str, reason: str) -> None:
        self.rejected.append(Rejected(source, reason))
        log.debug("quarantined %s: %s", source, reason)

    def process(
        self,
        files: Sequence[Any],
        process: Callable[[Any, Any], Sample | Rejected],
        format_ctx: Any,
        progress: Progress | None = None,
    ) -> set[str]:
        """Run every unit of ``files`` through ``process(format_ctx, file)``; returns the
        image ids that came (stored or not)."""
        # Units never span two shards' worth of files: with a small --shard-size, small units.
        size = min(UNIT_FILES, self.cfg.shard_max_samples)
        units = [
            (i, files[start : start + size]) for i, start in enumerate(range(0, len(files), size))
        ]
        scratch = tempfile.mkdtemp(prefix=f"ingest-{self.batch}-", dir=self.store.scratch_dir())
        ctx = UnitContext(
            scratch=scratch,
            dataset=self.dataset,
            batch=self.batch,
            fractions=self.fractions,
            secret=self.cfg.patient_secret,
            seen_ids=frozenset(self.seen_ids),
            seen_content=self.seen_content,
            patient_split=self.patient_split,
            process=process,
            format_ctx=format_ctx,
            counter=mp.get_context("fork").Value("l", 0),
        )
        came: set[str] = set()
        assembler = _Assembler(self.store, self.cfg, self.dataset, self.batch, scratch)
        try:
            with _ProgressPoller(ctx.counter, len(files), progress):
                results = run_ordered(
                    run_unit,
                    units,
                    workers=self.cfg.workers,
                    initializer=init_worker,
                    initargs=(ctx,),
                )
                for result in results:
                    came.update(result.came)
                    self._merge(result, assembler)
            self.summary.shards = assembler.finish()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return came

    def _merge(self, unit: UnitResult, assembler: _Assembler) -> None:
        """Add a unit's pieces and rows; an image already added by an earlier unit is not
        referenced again (its bytes stay, never read, in the shard)."""
        self.summary.skipped += unit.skipped
        self.rejected.extend(unit.rejected)
        shard_of = {slot: assembler.add(slot, piece) for slot, piece in unit.pieces.items()}
        for row in unit.rows:
            if row["image_id"] in self.seen_ids:
                self.summary.skipped += 1
                continue
            self.seen_ids.add(row["image_id"])
            writer = shard_of[row["shard"]]
            row["shard"] = writer.path
            row["offset"], row["size"] = writer.spans[row["key"]]  # where it lies in the shard
            self.rows.append(row)
            self.summary.ingested += 1
            self.summary.splits[row["split"]] = self.summary.splits.get(row["split"], 0) + 1

    def commit(self) -> BatchSummary:
        """The quarantine part, the batch record, then the manifest part: the commit."""
        q_rows = [
            {"source": r.source, "reason": r.reason, "dataset": self.dataset, "batch": self.batch}
            for r in self.rejected
        ]
        q_path = layout.quarantine_part(self.dataset, self.batch)
        if q_rows:
            manifest.write_part(self.store, q_path, manifest.to_table(q_rows, "quarantine"))
        elif self.store.exists(q_path):  # a stale part from an interrupted earlier attempt
            self.store.delete(q_path)
        record = {
            "dataset": self.dataset,
            "batch": self.batch,
            "inputs": self.inputs,
            "ingested": self.summary.ingested,
            "skipped": self.summary.skipped,
            "quarantined": len(self.rejected),
            "shards": self.summary.shards,
        }
        self.store.put(layout.batch_record(self.dataset, self.batch), json_bytes(record))
        table = manifest.to_table(self.rows, "samples")
        manifest.write_part(self.store, layout.manifest_part(self.dataset, self.batch), table)
        self.summary.quarantined = len(self.rejected)
        self.summary.committed = True
        return self.summary


class _Assembler:
    """Concatenates the units' pieces, in unit order, into shards of the final size and
    uploads each finished shard in the background."""

    def __init__(
        self, store: Store, cfg: BatchConfig, dataset: str, batch: str, scratch: str
    ) -> None:
        self.cfg, self.dataset, self.batch, self.scratch = cfg, dataset, batch, scratch
        self.uploader = ShardUploader(store)
        self.open: dict[tuple[str, str], ShardWriter] = {}
        self.next_index: dict[tuple[str, str], int] = {}
        self.done = 0

    def add(self, slot: tuple[str, str], piece: Piece) -> ShardWriter:
        """Append ``piece`` to its group's shard; returns that shard's writer."""
        if slot not in self.open:
            index = self.next_index.get(slot, 0)
            self.next_index[slot] = index + 1
            path = layout.shard_path(self.dataset, self.batch, *slot, index)
            self.open[slot] = ShardWriter(path, self.scratch)
        writer = self.open[slot]
        writer.append(piece)
        if writer.count >= self.cfg.shard_max_samples or writer.nbytes >= self.cfg.shard_max_bytes:
            self.uploader.submit(self.open.pop(slot))
            self.done += 1
        return writer

    def finish(self) -> int:
        for slot in sorted(self.open):
            self.uploader.submit(self.open.pop(slot))
            self.done += 1
        self.uploader.wait()
        return self.done


class _ProgressPoller:
    """Reports the workers' shared file counter to ``progress`` a few times a second."""

    def __init__(self, counter: Any, total: int, progress: Progress | None) -> None:
        self.counter, self.total, self.progress = counter, total, progress
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(0.25):
            self.progress(self.counter.value, self.total)  # type: ignore[misc]

    def __enter__(self) -> _ProgressPoller:
        if self.progress is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self.progress is not None:
            self.thread.join()
            self.progress(self.counter.value, self.total)
