"""The batches of a dataset: list them, and drop one (``pneumo batch list|drop``).

Dropping a batch undoes it: a wrong label file, a wrong folder, a half-written batch left
by a killed run. It is atomic where it matters:

1. a drop marker is put (``batches/<dataset>-<batch>.dropping``): a drop is under way;
2. the manifest part is deleted, in one delete: the batch's samples *and* its quarantine
   rows (read only for committed batches) disappear from every reader in that one step;
3. its quarantine part, progress records, shards and batch record are deleted, and
   what interrupted writes left (temp files, multipart uploads) is cleaned;
4. the drop marker is deleted.

Killed anywhere, running the same drop again finishes it; ingest refuses a batch whose drop
is under way. A dropped image is no longer in the dataset, so it can be ingested again.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import pyarrow.parquet as pq

from pneumo.shards import layout, manifest
from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BatchInfo:
    """One batch of a dataset, committed or not."""

    dataset: str
    batch: str
    state: str  # "committed", "interrupted" (never committed) or "dropping"
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
    """Drop a batch (see the module docstring); run again to finish an interrupted drop."""
    info = _info(store, dataset, batch, (dataset, batch) in manifest.committed_parts(store), 0)
    images = info.images or 0
    store.put(layout.drop_marker(dataset, batch), json.dumps({"dropping": batch}).encode())
    part = layout.manifest_part(dataset, batch)
    if store.exists(part):
        store.delete(part)  # the commit undone: samples and quarantine rows go together
        log.info("batch %s/%s: manifest part deleted", dataset, batch)
    shards = store.list(layout.batch_shard_prefix(dataset, batch))
    leftovers = (
        store.list(layout.quarantine_part_prefix(dataset, batch))
        + store.list(layout.batch_progress_prefix(dataset, batch))
        + shards
        + [p for p in [layout.batch_record(dataset, batch)] if store.exists(p)]
    )
    for path in leftovers:
        store.delete(path)
    for prefix in (
        layout.batch_shard_prefix(dataset, batch),
        layout.batch_progress_prefix(dataset, batch),
        layout.manifest_part_prefix(dataset, batch),
        layout.quarantine_part_prefix(dataset, batch),
    ):
        store.clean_incomplete(prefix)
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
