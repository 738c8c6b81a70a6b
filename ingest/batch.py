"""One ingest run = one batch: samples in, shards + quarantine + manifest part out.

Before any file is read, the parent fixes everything a unit decides with: the split policy
(``pneumo.ingest.patients``: the dataset's, fixed by its first batch), the patients already
committed and their splits, and the images already stored. The input files are then
processed in units on ``--workers`` processes (``pneumo.ingest.units``); the parent takes their
results in input order, drops what an earlier unit already gave (same id, same pixel bytes),
and joins the pieces into shards. The order of writes is what makes a batch safe to kill at
any moment (SIGKILL included):

0. the batch's lease (``pneumo.shards.lease``): one live attempt per batch;
1. shards, each stored whole (atomic put) under names of this attempt's own, and after
   every chunk of about ``chunk_files`` files a chunk record (``pneumo.ingest.chunks``);
2. the quarantine rows (read only once their batch is committed);
3. the batch record, then the rows, in one Delta commit that inserts only the images the
   dataset lacks (``pneumo.shards.commits.commit``): this is the commit.

Nothing reads a shard that no committed row names, so a killed run leaves nothing
visible. Running the same command again takes the batch over, keeps the chunks already
finished and does the rest; other writers committing the same images meanwhile are
seen at the commit: every image exactly once, whatever ran beside it.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import importlib.metadata
import logging
import multiprocessing as mp
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pneumo.ingest import chunks
from pneumo.ingest.chunks import ChunkRecord
from pneumo.ingest.patients import (
    BatchPolicy,
    PatientSecret,
    check_fractions,
    committed_splits,
)
from pneumo.ingest.reasons import reason_code
from pneumo.ingest.sources import run_ordered
from pneumo.ingest.units import (
    UNIT_FILES,
    Rejected,
    Sample,
    Stored,
    UnitContext,
    UnitResult,
    init_worker,
    json_bytes,
    run_unit,
    without,
)
from pneumo.shards import commits, layout, manifest
from pneumo.shards.errors import ConfigError
from pneumo.shards.lease import Lease
from pneumo.shards.store import Store
from pneumo.shards.tario import Piece, ShardUploader, ShardWriter

log = logging.getLogger(__name__)

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
    # None: $PNEUMO_PATIENT_KEY, or the user's own secret file (patients.resolve_secret)
    patient_secret: PatientSecret | None = field(default=None, repr=False)
    relabel: bool = False  # store images whose labels changed as a new labels version
    chunk_files: int = 8192  # a killed batch redoes at most this many files
    part: tuple[int, int] | None = None  # (I, N): ingest only part I of N of the listing

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.shard_max_samples < 1:
            raise ConfigError("--shard-size must be at least 1")
        if self.chunk_files < 1:
            raise ConfigError("chunk_files must be at least 1")
        if self.batch is not None:
            layout.check_name("batch", self.batch)
        if self.split_fractions is not None:
            check_fractions(self.split_fractions)
        if self.part is not None and not 0 <= self.part[0] < self.part[1]:
            raise ConfigError(f"--part {self.part[0]}/{self.part[1]}: need 0 <= I < N")


@dataclass(kw_only=True)
class BatchSummary:
    dataset: str
    batch: str
    ingested: int = 0
    skipped: int = 0  # already in the dataset (same id or same pixel bytes)
    duplicates: int = 0  # given more than once in this batch: stored once
    relabelled: int = 0  # stored again with new labels (a new labels version)
    label_changes: int = 0  # skipped images whose labels differ (see --relabel)
    quarantined: int = 0
    orphan_labels: int = 0  # label rows whose image is neither in the batch nor stored
    shards: int = 0
    resumed_files: int = 0  # files an earlier attempt had already finished
    committed: bool = False
    already_committed: bool = False
    version: int | None = None  # the manifest table version holding the batch
    splits: dict[str, int] = field(default_factory=dict)
    bases: dict[str, int] = field(default_factory=dict)  # patient_basis -> images
    kept_split: dict[str, tuple[str, str]] = field(default_factory=dict)  # key: (kept, policy)


class BatchRun:
    """One batch being written: units of files on worker processes, then the commit."""

    def __init__(
        self,
        store: Store,
        cfg: BatchConfig,
        dataset: str,
        batch: str,
        *,
        identity: str,
        policy: BatchPolicy,
        secret: PatientSecret,
        lease: Lease,
        sources: dict[str, Any] | None = None,
    ) -> None:
        self.store, self.cfg, self.dataset, self.batch = store, cfg, dataset, batch
        self.lease = lease
        self.sources = sources or {}  # where the inputs came from (the batch record)
        self.started_at = datetime.now(timezone.utc)
        self.committed_at: datetime | None = None
        self.identity, self.policy, self.secret = identity, policy, secret
        self.summary = BatchSummary(dataset=dataset, batch=batch)
        self.rows: list[dict[str, Any]] = []
        self.rejected: list[Rejected] = []
        self.came: set[str] = set()  # image ids that came, stored or not
        self._load_dataset()
        # What this batch has taken so far (the parent drops what a later unit repeats).
        self.batch_ids: set[str] = set()
        self.batch_content: set[str] = set()

    def _load_dataset(self) -> None:
        columns = ["dataset", "image_id", "key", "content_sha256", "patient_key", "split"]
        table = manifest.read(
            self.store, columns=columns + ["labels_sha256", "labels_version"], new_ok=True
        )
        rows = table.to_pylist()
        mine = [r for r in rows if r["dataset"] == self.dataset]
        self.stored = {
            r["image_id"]: Stored(r["labels_sha256"], r["labels_version"] or 1) for r in mine
        }
        self.stored_content = frozenset(r["content_sha256"] for r in mine)
        self.keys = {r["key"]: r["image_id"] for r in mine}
        self.committed = committed_splits(rows, self.policy.effective)

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
        """Run every unit of ``files`` through ``process(format_ctx, file)``, chunk by
        chunk; returns the image ids that came (stored or not)."""
        # Units never span two shards' worth of files: with a small --shard-size, small units.
        size = min(UNIT_FILES, self.cfg.shard_max_samples)
        units = [
            (i, files[start : start + size]) for i, start in enumerate(range(0, len(files), size))
        ]
        per_chunk = max(1, self.cfg.chunk_files // size)
        run_id = self._run_id(size, per_chunk)
        scratch_root = self.store.scratch_dir()
        previous = self.lease.previous
        dead_scratch = (
            list(scratch_root.glob(f"ingest-{self.batch}-{previous.attempt}-*"))
            if scratch_root is not None and previous is not None
            else []
        )
        done = chunks.resume(self.store, self.dataset, self.batch, run_id, dead_scratch)
        assembler = _Assembler(self.store, self.cfg, self.dataset, self.batch, self.lease.attempt)
        for record in done:
            self._take_rows(record.rows)
            self._add_chunk(record)
            assembler.next_index.update(record.next_index)
        todo = units[len(done) * per_chunk :]
        self.summary.resumed_files = min(len(files), len(done) * per_chunk * size)
        prefix = f"ingest-{self.batch}-{self.lease.attempt}-"
        scratch = tempfile.mkdtemp(prefix=prefix, dir=scratch_root)
        assembler.scratch = scratch
        ctx = self._unit_context(scratch, process, format_ctx, self.summary.resumed_files)
        record = ChunkRecord(run_id=run_id, index=len(done))
        try:
            results = run_ordered(
                run_unit, todo, workers=self.cfg.workers, initializer=init_worker, initargs=(ctx,)
            )
            # closing: the pool is stopped before the scratch folder goes (an interrupt)
            with _ProgressPoller(ctx.counter, len(files), progress), contextlib.closing(results):
                for result in results:
                    self._merge(result, assembler, record, scratch)
                    if (result.index + 1) % per_chunk == 0 or result.index + 1 == len(units):
                        record.shards = assembler.flush()
                        record.next_index = dict(assembler.next_index)
                        self.lease.check()
                        chunks.save(self.store, self.dataset, self.batch, record)
                        self._add_chunk(record)
                        record = ChunkRecord(run_id=run_id, index=record.index + 1)
        except BaseException:
            self.lease.end()  # stopped on an error or signal: a rerun takes over at once
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return self.came

    def _run_id(self, unit_size: int, per_chunk: int) -> str:
        cfg = self.cfg
        text = f"{self.identity}:{unit_size}:{per_chunk}"
        text += f":{cfg.shard_max_samples}:{cfg.shard_max_bytes}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _unit_context(self, scratch: str, process: Any, format_ctx: Any, done: int) -> UnitContext:
        return UnitContext(
            scratch=scratch,
            dataset=self.dataset,
            batch=self.batch,
            policy=self.policy.effective,
            secret=self.secret,
            relabel=self.cfg.relabel,
            stored=self.stored,
            stored_content=self.stored_content,
            committed=self.committed,
            process=process,
            format_ctx=format_ctx,
            counter=mp.get_context("fork").Value("l", done),
        )

    def _merge(
        self, unit: UnitResult, assembler: _Assembler, record: ChunkRecord, scratch: str
    ) -> None:
        """Add a unit's pieces and rows, without what an earlier unit of this batch already
        gave (same id, or same pixel bytes): every image is stored and referenced once."""
        record.add(unit)
        drop: dict[tuple[str, str], set[str]] = {}
        kept = []
        for row in unit.rows:
            problem = self._repeat(row)
            if problem is None:
                self._take_rows([row])
                kept.append(row)
                continue
            drop.setdefault(row["shard"], set()).add(row["key"])
            if problem:
                record.rejected.append(
                    Rejected(f"image {row['image_id']}", problem, row["image_id"])
                )
            else:
                record.duplicates += 1
        shard_of = {}
        for slot, piece in unit.pieces.items():
            filtered = without(piece, drop[slot], scratch) if slot in drop else piece
            if filtered is not None:
                shard_of[slot] = assembler.add(slot, filtered)
        for row in kept:
            writer = shard_of[row["shard"]]
            row["shard"] = writer.path
            row["offset"], row["size"] = writer.spans[row["key"]]  # where it lies in the shard
            record.rows.append(row)

    def _repeat(self, row: dict[str, Any]) -> str | None:
        """None for a new image; "" for a repeat within the batch; else a key clash."""
        if row["image_id"] in self.batch_ids:
            return ""
        if row["labels_version"] == 1 and row["content_sha256"] in self.batch_content:
            return ""
        other = self.keys.get(row["key"])
        if other is not None and other != row["image_id"]:
            return f"its sample key {row['key']} is already used by image {other}"
        return None

    def _take_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.batch_ids.add(row["image_id"])
            self.batch_content.add(row["content_sha256"])
            self.keys[row["key"]] = row["image_id"]

    def _add_chunk(self, record: ChunkRecord) -> None:
        s = self.summary
        self.rows.extend(record.rows)
        self.rejected.extend(record.rejected)
        self.came.update(record.came)
        s.skipped += record.skipped
        s.duplicates += record.duplicates
        s.label_changes += record.label_changes
        s.kept_split.update(record.moved)
        s.shards += len(record.shards)
        for row in record.rows:
            s.ingested += 1
            s.relabelled += (row["labels_version"] or 1) > 1
            s.splits[row["split"]] = s.splits.get(row["split"], 0) + 1
            s.bases[row["patient_basis"]] = s.bases.get(row["patient_basis"], 0) + 1

    def commit(self) -> BatchSummary:
        """The quarantine rows, then the batch record and its rows in one Delta commit."""
        self.lease.check()
        q_rows = [
            {
                "source": _text(r.source),
                "reason": _text(r.reason),
                "reason_code": reason_code(r.reason),
                "dataset": self.dataset,
                "batch": self.batch,
            }
            for r in self.rejected
        ]
        commits.add_quarantine(self.store, manifest.to_table(q_rows, "quarantine"))
        self.summary.quarantined = len(self.rejected)
        if self.policy.write:  # an older dataset adopting this batch's secret check value
            settings = manifest.read_settings(self.store) or {}
            settings["schema_version"] = layout.SCHEMA_VERSION
            settings["split_policy"] = self.policy.policy.to_json()
            manifest.write_settings(self.store, settings)
        self.committed_at = datetime.now(timezone.utc)
        for row in self.rows:
            row["ingested_at"] = self.committed_at
        table = manifest.to_table(self.rows, "samples")
        self.lease.check()
        try:
            result = commits.commit(
                self.store, table, dataset=self.dataset, batch=self.batch, record=self._record()
            )
        except BaseException:
            self.lease.end()
            raise
        lost = table.num_rows - result.inserted - result.updated
        if lost and not result.already:
            # Another writer committed these images (same id or same pixels) first.
            log.warning(
                "batch %s: %d images were committed by another writer meanwhile: skipped",
                self.batch,
                lost,
            )
            self.summary.ingested -= lost
            self.summary.skipped += lost
        self.summary.version = result.version
        if not result.already:  # the counts as committed, and the version that holds them
            record = {**self._record(), "version": result.version}
            self.store.put(layout.batch_record(self.dataset, self.batch), json_bytes(record))
        self.lease.release()
        chunks.discard(self.store, self.dataset, self.batch)
        self.summary.committed = True
        return self.summary

    def _record(self) -> dict[str, Any]:
        s = self.summary
        return {
            "dataset": self.dataset,
            "batch": self.batch,
            "inputs": self.identity,
            "relabel": self.cfg.relabel,
            "policy": self.policy.effective.fingerprint()[:16],
            "ingested": s.ingested,
            "skipped": s.skipped,
            "duplicates": s.duplicates,
            "relabelled": s.relabelled,
            "quarantined": s.quarantined,
            "shards": s.shards,
            "kept_split": len(s.kept_split),
            "labels_without_image": s.orphan_labels,
            "sources": self.sources,
            "command": _command_line(),
            "pneumo_version": _version(),
            "user": getpass.getuser(),
            "host": socket.gethostname(),
            "attempt": self.lease.attempt,
            "started_at": self.started_at.isoformat(),
            "committed_at": self.committed_at.isoformat() if self.committed_at else None,
        }


def _command_line() -> list[str]:
    """The command that made the batch (``pneumo ingest ...``), as run."""
    return [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else []


def _version() -> str:
    try:
        return importlib.metadata.version("pneumo")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def _text(value: str) -> str:
    """File names may carry bytes that are not UTF-8 (surrogate escapes): show them as
    ``\\xff``, so the quarantine table can be written and the file still found."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


class _Assembler:
    """Concatenates the units' pieces, in unit order, into shards of the final size and
    uploads each finished shard in the background."""

    def __init__(
        self, store: Store, cfg: BatchConfig, dataset: str, batch: str, attempt: str
    ) -> None:
        self.store, self.cfg, self.dataset, self.batch = store, cfg, dataset, batch
        self.attempt = attempt
        self.scratch = ""
        self.uploader = ShardUploader(store)
        self.open: dict[tuple[str, str], ShardWriter] = {}
        self.next_index: dict[tuple[str, str], int] = {}
        self.finished: list[str] = []

    def add(self, slot: tuple[str, str], piece: Piece) -> ShardWriter:
        """Append ``piece`` to its group's shard; returns that shard's writer."""
        if slot not in self.open:
            index = self.next_index.get(slot, 0)
            self.next_index[slot] = index + 1
            path = layout.shard_path(self.dataset, self.batch, *slot, index, self.attempt)
            self.open[slot] = ShardWriter(path, self.scratch)
        writer = self.open[slot]
        writer.append(piece)
        if writer.count >= self.cfg.shard_max_samples or writer.nbytes >= self.cfg.shard_max_bytes:
            self._submit(slot)
        return writer

    def _submit(self, slot: tuple[str, str]) -> None:
        writer = self.open.pop(slot)
        self.uploader.submit(writer)
        self.finished.append(writer.path)

    def flush(self) -> list[str]:
        """Close every open shard and wait until all are stored; returns the shards stored
        since the last flush."""
        for slot in sorted(self.open):
            self._submit(slot)
        self.uploader.wait()
        self.uploader = ShardUploader(self.store)
        done, self.finished = self.finished, []
        return done


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
