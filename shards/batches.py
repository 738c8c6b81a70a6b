"""The batches of a dataset: list them, and drop one (``pneumo batch list|drop``).

Dropping a batch undoes it: a wrong label file, a wrong folder, a half-written batch left
by a killed run. It is atomic where it matters:

1. a drop marker is put (``batches/<dataset>-<batch>.dropping``): a drop is under way;
2. the batch record is deleted: its quarantine rows (read only for committed batches)
   disappear from every reader;
3. its rows are deleted from the manifest table in one Delta commit, then its quarantine
   rows; its progress records, leases and shards are deleted, and what interrupted writes
   left (temp files, multipart uploads) is cleaned;
4. the drop marker is deleted.

Killed anywhere, running the same drop again finishes it; ingest refuses a batch whose drop
is under way, and a drop refuses a batch that a live attempt is writing. A dropped image is
no longer in the dataset, so it can be ingested again (the table's earlier versions still
show it, until ``pneumo vacuum``).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from dataclasses import dataclass

import pyarrow.parquet as pq

from pneumo.shards import commits, layout, manifest
from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.lease import live_holder
from pneumo.shards.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BatchInfo:
    """One batch of a dataset, committed or not."""

    dataset: str
    batch: str
    # "committed", "committed, shards missing", "interrupted" (never committed), "dropping"
    state: str
    images: int | None  # manifest rows (None when not committed)
    quarantined: int | None
    shards: int  # tar files stored under its folder
    relabel: bool  # made with --relabel: its rows supersede older labels

    def to_dict(self) -> dict[str, object]:
        return dict(vars(self))


@dataclass(frozen=True, kw_only=True)
class DropSummary:
    dataset: str
    batch: str
    images: int  # manifest rows that disappeared (0 if the batch was not committed)
    shards: int  # tar files deleted
    was: str  # the state before the drop


def list_batches(store: Store) -> list[BatchInfo]:
    """Every batch of the dataset in ``store``, sorted by dataset and name."""
    committed = manifest.committed_parts(store)
    shards: dict[tuple[str, str], int] = {}
    for path in store.list(layout.SHARDS_DIR + "/"):
        parts = path.split("/")
        if len(parts) == 4 and parts[3].endswith(".tar"):
            shards[(parts[1], parts[2])] = shards.get((parts[1], parts[2]), 0) + 1
    found = set(committed) | set(shards) | _named_in_batches_dir(store)
    return [
        _info(store, d, b, (d, b) in committed, shards.get((d, b), 0)) for d, b in sorted(found)
    ]


def _named_in_batches_dir(store: Store) -> set[tuple[str, str]]:
    """Batches known by their record, progress or drop marker (``<dataset>-<batch>``; dataset
    names have no ``-``)."""
    out = set()
    for path in store.list(layout.BATCHES_DIR + "/"):
        name = path[len(layout.BATCHES_DIR) + 1 :].split("/", 1)[0]
        for suffix in (".json", ".dropping"):
            name = name.removesuffix(suffix)
        dataset, sep, batch = name.partition("-")
        if sep and dataset and batch:
            out.add((dataset, batch))
    return out


def _info(store: Store, dataset: str, batch: str, committed: bool, n_shards: int) -> BatchInfo:
    record = _record(store, dataset, batch)
    if store.exists(layout.drop_marker(dataset, batch)):
        state = "dropping"
    else:
        state = "committed" if committed else "interrupted"
    images = quarantined = None
    if committed:
        images = record.get("ingested")
        if images is None:  # a batch committed before batch records existed
            images = _rows(store, layout.manifest_part(dataset, batch))
        quarantined = record.get("quarantined")
        if images and n_shards == 0:
            state = "committed, shards missing"  # `pneumo verify` names each
    return BatchInfo(
        dataset=dataset,
        batch=batch,
        state=state,
        images=images,
        quarantined=quarantined,
        shards=n_shards,
        relabel=bool(record.get("relabel", False)),
    )


def find_batch(store: Store, name: str) -> tuple[str, str]:
    """``BATCH`` or ``DATASET/BATCH`` -> (dataset, batch).

    Raises:
        ConfigError: no such batch, or a bare name found in two datasets.
    """
    dataset, _, batch = name.rpartition("/")
    matches = [
        (b.dataset, b.batch)
        for b in list_batches(store)
        if b.batch == batch and dataset in ("", b.dataset)
    ]
    if not matches:
        known = ", ".join(f"{b.dataset}/{b.batch}" for b in list_batches(store)) or "none"
        raise ConfigError(f"no batch {name!r} in {store.url} (batches: {known})")
    if len(matches) > 1:
        raise ConfigError(f"batch {name!r} is in {len(matches)} datasets: give DATASET/{batch}")
    return matches[0]


def drop_batch(store: Store, dataset: str, batch: str) -> DropSummary:
    """Drop a batch (see the module docstring); run again to finish an interrupted drop.

    Raises:
        ConfigError: a live ingest attempt is writing the batch.
    """
    holder = live_holder(store, dataset, batch)
    if holder is not None:
        raise ConfigError(
            f"batch {batch!r} of {dataset} is being written by {holder.describe(time.time())}: "
            "stop it first"
        )
    shards = store.list(layout.batch_shard_prefix(dataset, batch))
    committed = (dataset, batch) in manifest.committed_parts(store)
    info = _info(store, dataset, batch, committed, len(shards))
    store.put(layout.drop_marker(dataset, batch), json.dumps({"dropping": batch}).encode())
    version = _record(store, dataset, batch).get("version")
    if manifest.is_legacy(store):
        commits.convert_legacy(store)
    record = layout.batch_record(dataset, batch)
    if store.exists(record):
        store.delete(record)
    images = commits.delete_batch(store, dataset, batch, version)
    log.info("batch %s/%s: %d rows deleted from the manifest", dataset, batch, images)
    leftovers = store.list(layout.batch_progress_prefix(dataset, batch)) + shards
    for path in leftovers:
        store.delete(path)
    for prefix in (
        layout.batch_shard_prefix(dataset, batch),
        layout.batch_progress_prefix(dataset, batch),
    ):
        store.clean_incomplete(prefix)
        folder = store.local_path(prefix)
        if folder is not None:  # the batch's own folders, empty now (hidden temp files aside)
            shutil.rmtree(folder, ignore_errors=True)
    store.delete(layout.drop_marker(dataset, batch))
    return DropSummary(
        dataset=dataset, batch=batch, images=images, shards=len(shards), was=info.state
    )


def _record(store: Store, dataset: str, batch: str) -> dict[str, object]:
    try:
        return json.loads(store.get(layout.batch_record(dataset, batch)))
    except (StoreError, ValueError):
        return {}


def _rows(store: Store, path: str) -> int | None:
    try:
        return pq.ParquetFile(io.BytesIO(store.get(path))).metadata.num_rows
    except (StoreError, OSError):
        return None
