"""``pneumo vacuum``: remove what no reader can reach, once it is old enough.

Ingest never deletes a shard: an attempt that was killed, or lost its lease, leaves the
shards it finished after its last chunk record, and a batch dropped by hand leaves the
table files of its earlier versions. Vacuum removes

- shards named by no row of the manifest's current version and belonging to no batch that
  is being written or can still be resumed (one with progress records or a lease),
- the manifest's and quarantine's data files that no version within the retention
  period uses (Delta's own vacuum),

only when they are older than ``retention_hours`` (default a week): a reader that opened
an earlier table version, or a training job streaming it, keeps working meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from deltalake.exceptions import DeltaError

from pneumo.shards import commits, layout, manifest
from pneumo.shards.errors import ConfigError, ManifestError
from pneumo.shards.store import Store

log = logging.getLogger(__name__)

DEFAULT_RETENTION_HOURS = 168.0


@dataclass(kw_only=True)
class VacuumSummary:
    dry_run: bool
    retention_hours: float
    shards: list[str] = field(default_factory=list)  # removed (or would be)
    too_young: int = 0  # unreferenced shards kept because they are newer than the retention
    in_progress: int = 0  # shards of batches being written or resumable
    table_files: int = 0  # Delta data files removed (or would be)

    def to_dict(self) -> dict[str, object]:
        return dict(vars(self))


def vacuum(
    store: Store, *, retention_hours: float = DEFAULT_RETENTION_HOURS, dry_run: bool = False
) -> VacuumSummary:
    """Remove unreferenced shards and table files older than ``retention_hours``.

    Raises:
        ConfigError: a negative retention.
        ManifestError: the dataset has no manifest table.
    """
    if retention_hours < 0:
        raise ConfigError("--retention-hours must not be negative")
    manifest.require_dataset(store)
    commits.convert_legacy(store)
    summary = VacuumSummary(dry_run=dry_run, retention_hours=retention_hours)
    listed = [p for p in store.list(layout.SHARDS_DIR + "/") if p.endswith(".tar")]
    referenced = set(
        manifest.read(store, columns=["shard"], new_ok=True).column("shard").to_pylist()
    )
    active = _batches_in_progress(store)
    cutoff = time.time() - retention_hours * 3600
    for path in listed:
        if path in referenced:
            continue
        parts = path.split("/")
        if len(parts) == 4 and (parts[1], parts[2]) in active:
            summary.in_progress += 1
            continue
        if store.modified(path) > cutoff:
            summary.too_young += 1
            continue
        summary.shards.append(path)
    if not dry_run:
        # Checked again just before deleting: a batch may have begun since the listing.
        active = _batches_in_progress(store)
        for path in summary.shards:
            parts = path.split("/")
            if (parts[1], parts[2]) not in active:
                store.delete(path)
                log.info("removed %s", path)
    for table in ("samples", "quarantine"):
        dt = manifest.open_table(store, table)  # type: ignore[arg-type]
        if dt is None:
            continue
        try:
            files = dt.vacuum(
                retention_hours=int(retention_hours),
                dry_run=dry_run,
                enforce_retention_duration=False,
            )
        except DeltaError as e:
            raise ManifestError(f"{store.url}: vacuum of the {table} table failed: {e}") from e
        summary.table_files += len(files)
    return summary


def _batches_in_progress(store: Store) -> set[tuple[str, str]]:
    """(dataset, batch) of every batch with progress records or a lease."""
    out = set()
    for path in store.list(layout.BATCHES_DIR + "/"):
        name = path[len(layout.BATCHES_DIR) + 1 :]
        folder, sep, _ = name.partition("/")
        dataset, dash, batch = folder.partition("-")
        if sep and dash:
            out.add((dataset, batch))
    return out
