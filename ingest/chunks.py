"""Progress of a batch being written, so a killed or failed batch resumes instead of restarting.

A batch's units are grouped in *chunks* of about ``chunk_files`` input files. At the end
of a chunk every open shard is closed and stored, then a chunk record is put under
``batches/<dataset>-<batch>/``: the chunk's manifest rows, quarantine rows and counts.
A rerun of the same command (which holds the batch's lease, :mod:`pneumo.shards.lease`,
so the attempt that wrote the records is gone) keeps the shards named by the records it
can use (a contiguous run from the first chunk, written with the same inputs and shard
settings), deletes the records it cannot use and what killed writes left half-done
(temp files, multipart uploads), and starts at the first chunk without a record. At most
one chunk of files is processed again. It never deletes a shard: the shards an earlier
attempt finished after its last record are named by no record and no manifest row, and
``pneumo vacuum`` removes them once old enough.

The records are deleted once the batch commits.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo.ingest.units import Rejected, UnitResult
from pneumo.shards import layout
from pneumo.shards.errors import StoreError
from pneumo.shards.store import Store

log = logging.getLogger(__name__)

_RECORD = re.compile(r"chunk-(\d{6})\.json\.gz$")


@dataclass(kw_only=True)
class ChunkRecord:
    """What one finished chunk added to its batch."""

    run_id: str  # the inputs and shard settings it was written with
    index: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    came: list[str] = field(default_factory=list)
    skipped: int = 0
    duplicates: int = 0
    label_changes: int = 0
    moved: dict[str, tuple[str, str]] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)  # stored in full
    next_index: dict[tuple[str, str], int] = field(default_factory=dict)  # per shard group

    def add(self, unit: UnitResult) -> None:
        """Count a unit's rejections and skips (its rows are added one by one)."""
        self.rejected.extend(unit.rejected)
        self.came.extend(unit.came)
        self.skipped += unit.skipped
        self.duplicates += unit.duplicates
        self.label_changes += unit.label_changes
        self.moved.update(unit.moved)

    def to_bytes(self) -> bytes:
        data = {
            "run_id": self.run_id,
            "index": self.index,
            "rows": self.rows,
            "rejected": [[r.source, r.reason, r.image_id] for r in self.rejected],
            "came": self.came,
            "counts": [self.skipped, self.duplicates, self.label_changes],
            "moved": {k: list(v) for k, v in sorted(self.moved.items())},
            "shards": self.shards,
            "next_index": [[s, g, n] for (s, g), n in sorted(self.next_index.items())],
        }
        # Level 1: a tenth of the default's time, at the end of the batch where nothing overlaps.
        return gzip.compress(json.dumps(data, sort_keys=True).encode(), compresslevel=1, mtime=0)

    @classmethod
    def from_bytes(cls, blob: bytes) -> ChunkRecord:
        data = json.loads(gzip.decompress(blob))
        skipped, duplicates, label_changes = data["counts"]
        return cls(
            run_id=data["run_id"],
            index=data["index"],
            rows=data["rows"],
            rejected=[Rejected(*r) for r in data["rejected"]],
            came=data["came"],
            skipped=skipped,
            duplicates=duplicates,
            label_changes=label_changes,
            moved={k: (v[0], v[1]) for k, v in data["moved"].items()},
            shards=data["shards"],
            next_index={(s, g): n for s, g, n in data["next_index"]},
        )


def save(store: Store, dataset: str, batch: str, record: ChunkRecord) -> None:
    store.put(layout.chunk_record(dataset, batch, record.index), record.to_bytes())


def resume(
    store: Store, dataset: str, batch: str, run_id: str, dead_scratch: list[Path]
) -> list[ChunkRecord]:
    """The usable records of earlier attempts (the caller holds the batch's lease);
    records it cannot use are deleted, shards never. ``dead_scratch``: local scratch
    folders of the dead attempt taken over, removed."""
    records = _usable(store, dataset, batch, run_id)
    keep = {s for r in records for s in r.shards}
    stale_records = [
        layout.chunk_record(dataset, batch, i)
        for i in _indexes(store, dataset, batch)
        if i >= len(records)
    ]
    for path in stale_records:
        store.delete(path)
    for prefix in (
        layout.batch_shard_prefix(dataset, batch),
        layout.batch_progress_prefix(dataset, batch),
    ):
        store.clean_incomplete(prefix)
    for old in dead_scratch:
        shutil.rmtree(old, ignore_errors=True)
    if records or stale_records:
        log.warning(
            "batch %s was interrupted: keeping %d finished chunks (%d shards), redoing the rest",
            batch,
            len(records),
            len(keep),
        )
    return records


def discard(store: Store, dataset: str, batch: str) -> None:
    """Delete the progress records of a committed (or dropped) batch (leases too), and
    their folder on a local store."""
    prefix = layout.batch_progress_prefix(dataset, batch)
    for path in store.list(prefix):
        store.delete(path)
    folder = store.local_path(prefix)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)  # only hidden temp files can be left


def _usable(store: Store, dataset: str, batch: str, run_id: str) -> list[ChunkRecord]:
    """Records 0, 1, 2, ... of this run, up to the first missing, foreign or unreadable one."""
    records: list[ChunkRecord] = []
    for index in _indexes(store, dataset, batch):
        if index != len(records):
            break
        try:
            record = ChunkRecord.from_bytes(store.get(layout.chunk_record(dataset, batch, index)))
        except (StoreError, OSError, EOFError, ValueError, KeyError, TypeError) as e:
            log.warning(
                "chunk record %d of batch %s is unreadable (%s): redoing it", index, batch, e
            )
            break
        if record.run_id != run_id:
            log.warning(
                "batch %s was begun with other inputs or shard settings: starting it afresh",
                batch,
            )
            break
        records.append(record)
    return records


def _indexes(store: Store, dataset: str, batch: str) -> list[int]:
    found = (_index(p) for p in store.list(layout.batch_progress_prefix(dataset, batch)))
    return sorted(i for i in found if i is not None)


def _index(path: str) -> int | None:
    match = _RECORD.search(path)
    return int(match.group(1)) if match else None
