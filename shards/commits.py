"""How rows enter the manifest tables: a batch's commit, quarantine rows, undoing a batch,
converting a dataset written before the table format. Reading is :mod:`pneumo.shards.manifest`.

A commit is a Delta MERGE (insert the images the dataset lacks, update those a relabel
batch relabels) carrying the batch as an idempotent transaction; it is retried when it
loses a race to another writer, and looked for in the table when the store reported an
error after taking it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import (
    CommitFailedError,
    DeltaError,
    DeltaProtocolError,
    SchemaMismatchError,
)

from pneumo.shards import layout, manifest
from pneumo.shards.errors import ManifestError, StoreError
from pneumo.shards.store import Store

log = logging.getLogger(__name__)

# A MERGE that lost a race to another writer is retried from the new version this often.
MAX_COMMIT_TRIES = 40
# A commit that fails for another reason (the store) is tried this often.
MAX_STORE_ERRORS = 4


@dataclass(frozen=True, kw_only=True)
class CommitResult:
    version: int  # the table version that holds the batch
    inserted: int  # new images
    updated: int  # images relabelled
    already: bool = False  # the batch's transaction was there already: nothing written
    retries: int = 0  # races lost to other writers


def commit(
    store: Store,
    rows: pa.Table,
    *,
    dataset: str,
    batch: str,
    record: dict[str, Any] | None = None,
) -> CommitResult:
    """Commit a batch's rows, once: insert each new image, update relabelled ones.

    A row is new when the dataset has neither its image id nor (for a first labels
    version) its pixel bytes; a relabel row replaces the row of its image when its
    ``labels_version`` is higher. A commit that loses a race to another writer is retried
    from the new version, so images that writer committed first are not inserted again.
    Running it again after it succeeded writes nothing (the batch's transaction is there).
    The batch record (``record``: what the batch was made from, its counts) is put first:
    a batch is committed when its record and its transaction both exist.
    """
    convert_legacy(store)
    dt = manifest.open_table(store)
    app = manifest.transaction_id(dataset, batch)
    if dt is not None and dt.transaction_version(app) is not None:
        return CommitResult(version=dt.version(), inserted=0, updated=0, already=True)
    record = {"dataset": dataset, "batch": batch, **(record or {})}
    store.put(layout.batch_record(dataset, batch), json.dumps(record, indent=1).encode())
    rows = rows.cast(manifest.SAMPLES_SCHEMA)
    txn = CommitProperties(
        app_transactions=[Transaction(app, 1)],
        custom_metadata={"pneumo.batch": batch, "pneumo.dataset": dataset},
        max_commit_retries=MAX_COMMIT_TRIES,
    )
    uri, options = manifest.location(store, "samples")
    errors = 0
    for attempt in range(MAX_COMMIT_TRIES):
        if attempt:  # the versions other writers committed meanwhile
            dt = _refreshed(store, dt)
        if dt is not None and dt.transaction_version(app) is not None:
            return CommitResult(version=dt.version(), inserted=0, updated=0, already=True)
        try:
            if dt is None:
                dt = ensure_table(store, "samples")
            if rows.num_rows == 0:
                # An empty batch still records its transaction (no row: nothing to double).
                write_deltalake(
                    uri,
                    manifest.SAMPLES_SCHEMA.empty_table(),
                    mode="append",
                    storage_options=options,
                    commit_properties=txn,
                    schema_mode="merge",
                )
                done = manifest.open_table(store)
                assert done is not None
                return CommitResult(version=done.version(), inserted=0, updated=0, retries=attempt)
            metrics = (
                dt.merge(
                    rows,
                    _MERGE_PREDICATE.format(dataset=_sql_str(dataset)),
                    source_alias="s",
                    target_alias="t",
                    merge_schema=True,  # a table made by an earlier pneumo gains new columns
                    commit_properties=txn,
                )
                .when_matched_update_all(predicate="s.labels_version > t.labels_version")
                .when_not_matched_insert_all()
                .execute()
            )
        except CommitFailedError:
            time.sleep(random.uniform(0.05, 0.2 * (attempt + 1)))
            continue
        except (DeltaError, OSError) as e:
            # The store may have taken the commit and lost the answer (a reset after the
            # put): look before trying again. Two first writers creating the table at once
            # end here too, and the loser merges into the winner's table at the next try.
            landed = _landed(store, app, dataset, batch, attempt)
            if landed is not None:
                return landed
            errors += 1
            if errors < MAX_STORE_ERRORS and not isinstance(
                e, (SchemaMismatchError, DeltaProtocolError)
            ):
                log.info("commit of batch %s failed, retrying: %s", batch, manifest.first_line(e))
                time.sleep(random.uniform(0.2, 1.0) * errors)
                continue
            kind = StoreError if isinstance(e, OSError) else ManifestError
            raise kind(f"{uri}: commit of batch {batch} failed: {manifest.first_line(e)}") from e
        result = CommitResult(
            version=dt.version(),  # the merge moved the table to its own commit
            inserted=int(metrics["num_target_rows_inserted"]),
            updated=int(metrics["num_target_rows_updated"]),
            retries=attempt,
        )
        _compact_if_fragmented(dt, dataset)
        return result
    raise ManifestError(
        f"{uri}: batch {batch} lost the commit race {MAX_COMMIT_TRIES} times; run it again"
    )


def ensure_table(store: Store, table: manifest.TableName) -> DeltaTable:
    """The table, created empty if it does not exist yet. Rows never enter a table through
    the write that creates it: delta-rs retries a plain append that lost a race as the next
    version, so two first writers would both have inserted theirs."""
    uri, options = manifest.location(store, table)
    schema = manifest.SAMPLES_SCHEMA if table == "samples" else manifest.QUARANTINE_SCHEMA
    try:
        DeltaTable.create(
            uri,
            schema,
            mode="ignore",
            partition_by=["dataset"],
            configuration=TABLE_CONFIGURATION,
            storage_options=options,
        )
    except DeltaError as e:  # another writer created it at the same moment
        log.info("%s: created by another writer meanwhile (%s)", uri, manifest.first_line(e))
    except OSError as e:
        raise StoreError(f"{uri}: cannot create the table: {manifest.first_line(e)}") from e
    dt = manifest.open_table(store, table)
    if dt is None:
        raise ManifestError(f"{uri}: the table was created but cannot be opened")
    return dt


def _refreshed(store: Store, dt: DeltaTable | None) -> DeltaTable | None:
    """The table at its latest version (read incrementally from ``dt``'s)."""
    if dt is None:
        return manifest.open_table(store)
    try:
        dt.update_incremental()
    except (DeltaError, OSError) as e:
        raise StoreError(f"{dt.table_uri}: cannot read the table: {manifest.first_line(e)}") from e
    return dt


# A checkpoint (the table's state in one Parquet file) every 10 commits: opening the table
# reads at most 9 commit files after it. With delta-rs's default of 100, opening a table
# on S3 took up to 100 GETs, most of a commit's time on a loopback S3 server.
TABLE_CONFIGURATION = {"delta.checkpointInterval": "10"}


# Each commit adds a file or two; a MERGE joins with, and a read opens, every file of the
# dataset's partition: past this many files they are compacted into a few.
COMPACT_AFTER_FILES = 24


def _compact_if_fragmented(dt: DeltaTable, dataset: str) -> None:
    """Rewrite a fragmented partition into few files (a commit of its own, without
    changing any row). A compaction that loses a race is left to the next commit."""
    partition = [("dataset", "=", dataset)]
    if len(dt.file_uris(partition)) <= COMPACT_AFTER_FILES:
        return
    try:
        dt.optimize.compact(partition_filters=partition)
    except (CommitFailedError, DeltaError) as e:
        log.info("compaction of the %s rows skipped: %s", dataset, manifest.first_line(e))


def _landed(store: Store, app: str, dataset: str, batch: str, attempt: int) -> CommitResult | None:
    """The batch's commit, if it is in the table although its writer saw an error."""
    dt = manifest.open_table(store)
    if dt is None or dt.transaction_version(app) is None:
        return None
    rows = manifest.scan(manifest.arrow_dataset(store, dt, "samples"), manifest.SAMPLES_SCHEMA)
    mine = rows.filter((pc.field("dataset") == dataset) & (pc.field("batch") == batch))
    log.warning("batch %s: its commit landed although the store reported an error", batch)
    return CommitResult(version=dt.version(), inserted=mine.num_rows, updated=0, retries=attempt)


# Same dataset, and the same image id, or (for a first labels version) the same pixels.
_MERGE_PREDICATE = (
    "t.dataset = {dataset} AND t.dataset = s.dataset AND (t.image_id = s.image_id OR "
    "(s.labels_version = 1 AND t.content_sha256 = s.content_sha256))"
)


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def add_quarantine(store: Store, rows: pa.Table) -> None:
    """Add quarantine rows, each (dataset, batch, source) once however often it is run."""
    convert_legacy(store)
    _merge_quarantine(store, rows)


def _merge_quarantine(store: Store, rows: pa.Table) -> None:
    if rows.num_rows == 0:
        return
    rows = rows.cast(manifest.QUARANTINE_SCHEMA)
    uri, _ = manifest.location(store, "quarantine")
    for attempt in range(MAX_COMMIT_TRIES):
        dt = manifest.open_table(store, "quarantine") or ensure_table(store, "quarantine")
        try:
            (
                dt.merge(
                    rows,
                    "t.dataset = s.dataset AND t.batch = s.batch AND t.source = s.source",
                    source_alias="s",
                    target_alias="t",
                    merge_schema=True,
                )
                .when_not_matched_insert_all()
                .execute()
            )
            return
        except CommitFailedError:
            time.sleep(random.uniform(0.05, 0.2 * (attempt + 1)))
        except DeltaError as e:
            raise ManifestError(f"{uri}: {manifest.first_line(e)}") from e
        except OSError as e:
            raise StoreError(f"{uri}: {manifest.first_line(e)}") from e
    raise ManifestError(f"{uri}: lost the commit race {MAX_COMMIT_TRIES} times; run it again")


def delete_batch(store: Store, dataset: str, batch: str, version: int | None = None) -> int:
    """Undo a batch: its new images leave the manifest and the images it relabelled get
    back the rows they had before it (the table as of ``version - 1``, ``version`` being
    the batch's commit), in one commit; then its quarantine rows go. Returns the number of
    its rows removed or restored."""
    where = f"t.dataset = {_sql_str(dataset)} AND t.batch = {_sql_str(batch)}"
    done = 0
    for attempt in range(MAX_COMMIT_TRIES):
        dt = manifest.open_table(store)
        if dt is None:
            break
        before = _rows_before(store, dt, dataset, batch, version)
        try:
            metrics = (
                dt.merge(
                    before,
                    f"{where} AND t.image_id = s.image_id",
                    source_alias="s",
                    target_alias="t",
                )
                .when_matched_update_all()
                .when_not_matched_by_source_delete(predicate=where)
                .execute()
            )
        except CommitFailedError:
            time.sleep(random.uniform(0.05, 0.2 * (attempt + 1)))
            continue
        done = int(metrics["num_target_rows_deleted"]) + int(metrics["num_target_rows_updated"])
        break
    q = manifest.open_table(store, "quarantine")
    if q is not None:
        q.delete(f"dataset = {_sql_str(dataset)} AND batch = {_sql_str(batch)}")
    return done


def _rows_before(
    store: Store, dt: DeltaTable, dataset: str, batch: str, version: int | None
) -> pa.Table:
    """The earlier rows of the images a batch relabelled (empty if it relabelled none)."""
    every = manifest.scan(manifest.arrow_dataset(store, dt, "samples"), manifest.SAMPLES_SCHEMA)
    mine = every.filter((pc.field("dataset") == dataset) & (pc.field("batch") == batch))
    relabelled = [
        i
        for i, v in zip(
            mine.column("image_id").to_pylist(),
            mine.column("labels_version").to_pylist(),
            strict=True,
        )
        if (v or 1) > 1
    ]
    if not relabelled:
        return manifest.SAMPLES_SCHEMA.empty_table()
    version = version if version is not None else _commit_version(dt, dataset, batch)
    if version is None or version == 0:
        raise ManifestError(
            f"batch {batch}: cannot find the table version it was committed in, so the "
            "labels it replaced cannot be restored"
        )
    old = manifest.open_table(store, version=version - 1)
    assert old is not None
    rows = manifest.scan(manifest.arrow_dataset(store, old, "samples"), manifest.SAMPLES_SCHEMA)
    return rows.filter((pc.field("dataset") == dataset) & pc.field("image_id").isin(relabelled))


def _commit_version(dt: DeltaTable, dataset: str, batch: str) -> int | None:
    """The table version whose commit carried the batch (from the table's history)."""
    for entry in dt.history():
        if entry.get("pneumo.batch") == batch and entry.get("pneumo.dataset") == dataset:
            return int(entry["version"])
    return None


CONVERSION_APP = "pneumo/convert-legacy"  # the Delta transaction of a conversion


def convert_legacy(store: Store) -> bool:
    """Convert a dataset of hive Parquet parts into the two tables; True if this call
    converted it. The rows go in by one MERGE carrying the conversion's transaction, so
    racing or repeated conversions add each image once; the parts are removed only once
    that transaction is in the table (a conversion killed before it starts again)."""
    settings = manifest.read_settings(store) or {}
    if manifest.has_table(store):
        if "converted_batches" not in settings or settings.get("legacy_parts_removed"):
            return False  # a table from the start, or a finished conversion
    elif not manifest.legacy_parts(store, "samples"):
        return False
    batches = sorted(manifest.legacy_committed(store))
    samples = manifest.legacy_dataset(store, "samples")
    rows = manifest.latest_labels(samples, samples.to_table()).cast(manifest.SAMPLES_SCHEMA)
    quarantine = manifest.read(store, table="quarantine")
    if "converted_batches" not in settings:
        settings["converted_batches"] = [list(b) for b in batches]
        manifest.write_settings(store, settings)
    _merge_quarantine(store, quarantine)
    for attempt in range(MAX_COMMIT_TRIES):
        dt = ensure_table(store, "samples")
        if dt.transaction_version(CONVERSION_APP) is not None:
            break
        try:
            (
                dt.merge(
                    rows,
                    "t.dataset = s.dataset AND t.image_id = s.image_id",
                    source_alias="s",
                    target_alias="t",
                    merge_schema=True,
                    commit_properties=CommitProperties(
                        app_transactions=[Transaction(CONVERSION_APP, 1)]
                    ),
                )
                .when_not_matched_insert_all()
                .execute()
            )
            break
        except CommitFailedError:
            time.sleep(random.uniform(0.05, 0.2 * (attempt + 1)))
    else:
        raise ManifestError(f"{store.url}: the manifest's conversion lost {MAX_COMMIT_TRIES} races")
    _remove_legacy_parts(store)
    log.warning(
        "%s: manifest converted to a Delta table (%d rows, %d batches)",
        store.url,
        rows.num_rows,
        len(batches),
    )
    return True


def _remove_legacy_parts(store: Store) -> None:
    """Delete the hive parts a conversion copied into the tables, then say so in the
    settings (later commits need not list the folder again)."""
    for table in ("samples", "quarantine"):
        for path in manifest.legacy_parts(store, table):  # type: ignore[arg-type]
            store.delete(path)
    settings = manifest.read_settings(store) or {}
    settings["legacy_parts_removed"] = True
    manifest.write_settings(store, settings)
