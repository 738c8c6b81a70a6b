"""The manifest: a Delta Lake table with one row per stored image, and its quarantine.

A batch's shards are written first (plain WebDataset tars, named by the attempt that wrote
them, never overwritten); its rows become visible in one Delta commit. The commit is a
MERGE that inserts a row only when the dataset holds neither its image id nor, for a new
image, its pixel bytes, and updates the row of an image relabelled by a later batch
(``labels_version`` + 1); it carries the batch as an idempotent Delta transaction
(``app_id`` = ``DATASET/BATCH``). Commits are conditional puts of the table's log (no lock
service): two writers racing on the same rows see one of them fail and retry from the new
version, so every image is committed once whatever the number of writers.

Anyone reads the current version, one row per image, with the reader of their choice::

    deltalake.DeltaTable("DATASET/manifest").to_pandas()
    deltalake.DeltaTable("DATASET/manifest").to_pyarrow_dataset()
    polars.read_delta("DATASET/manifest")

and an earlier one by ``version=`` (the labels an image had before a relabel, say).
``DATASET/quarantine`` is a second table: the inputs that could not be ingested and why;
its rows count once their batch is committed.

Datasets written before the table format (one hive Parquet part per batch under
``manifest/dataset=*/batch=*/``) are read as they are and converted by their next write.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.exceptions import (
    DeltaError,
    TableNotFoundError,
)

from pneumo.shards import layout
from pneumo.shards.errors import ManifestError, StoreError
from pneumo.shards.query import parse_where
from pneumo.shards.s3 import S3Store
from pneumo.shards.store import LocalStore, Store

log = logging.getLogger(__name__)

SAMPLES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # dot-free sample key inside the tar
        ("image_id", pa.string()),  # SIIM SOPInstanceUID / NIH "Image Index"
        ("dataset", pa.string()),  # "siim" | "nih"
        ("batch", pa.string()),
        ("shard", pa.string()),  # tar path relative to DATASET
        ("offset", pa.int64()),  # byte offset of the sample's first tar header in its shard
        ("size", pa.int64()),  # bytes of its members, headers and padding included; both
        # null in schema-1 datasets (read then by streaming the whole shard)
        ("split", pa.string()),  # "train" | "val" | "test"
        ("has_ptx", pa.bool_()),  # null = unlabelled
        ("n_instances", pa.int16()),  # SIIM mask rows (instances); NIH boxes for Pneumothorax
        ("mask_area_px", pa.int64()),  # null when there is no mask
        ("rows", pa.int32()),
        ("cols", pa.int32()),
        ("patient_key", pa.string()),  # keyed hash of the patient id, never the id itself
        ("view_position", pa.string()),
        ("sex", pa.string()),
        ("age_years", pa.float32()),
        ("content_sha256", pa.string()),  # of the stored image bytes
        ("image_format", pa.string()),  # "jpeg" (frame as-is) | "png" (8-bit) | "npy" (16-bit)
        ("bit_depth", pa.int8()),  # 8 | 16
        ("transfer_syntax", pa.string()),  # source DICOM transfer syntax; "png" for NIH
        ("findings", pa.list_(pa.string())),  # NIH findings; SIIM: ["Pneumothorax"] or []
        ("n_boxes", pa.int16()),  # NIH bounding boxes kept with the sample
        # How patient_key was made: "nih-patient-id", "nih-xref", "dicom-patient-id",
        # "dicom:<attributes>", "dicom-image" ("siim-image" in older datasets). A basis
        # ending in "-image" is image-level: the image is its own patient.
        ("patient_basis", pa.string()),
        ("labels_version", pa.int16()),  # 1, then +1 for each batch that relabels the image
        ("labels_sha256", pa.string()),  # of the label rows the sample was made from
        # When the row was committed (UTC); null in datasets written before it existed.
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"pneumo.schema_version": str(layout.SCHEMA_VERSION)},
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # file path or "labels.csv:LINE"
        ("reason", pa.string()),  # what was wrong, in words
        ("reason_code", pa.string()),  # one of a small set (pneumo.ingest.reasons.CODES)
        ("dataset", pa.string()),
        ("batch", pa.string()),
    ],
    metadata={"pneumo.schema_version": str(layout.SCHEMA_VERSION)},
)

TableName = Literal["samples", "quarantine"]
_DIRS = {"samples": layout.MANIFEST_DIR, "quarantine": layout.QUARANTINE_DIR}
_SCHEMAS = {"samples": SAMPLES_SCHEMA, "quarantine": QUARANTINE_SCHEMA}


def to_table(rows: Sequence[dict[str, Any]], table: TableName = "samples") -> pa.Table:
    """Rows (dicts) to a table with the manifest's schema, rows sorted by key/source."""
    schema = _SCHEMAS[table]
    order = "key" if table == "samples" else "source"
    rows = sorted(rows, key=lambda r: r[order])
    return pa.Table.from_pylist(list(rows), schema=schema)


def write_part(store: Store, path: str, table: pa.Table) -> None:
    """Write one Parquet file atomically (readers see all of it or none)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put(path, buf.getvalue())


# --- Where the tables are ------------------------------------------------------------


def location(store: Store, table: TableName) -> tuple[str, dict[str, str] | None]:
    """The table's URI and ``storage_options`` for deltalake."""
    if isinstance(store, S3Store):
        return store.table_uri(_DIRS[table]), store.delta_options()
    if isinstance(store, LocalStore):
        return str(store.root / _DIRS[table]), None
    raise ManifestError(f"unsupported store {store.url}")


def open_table(
    store: Store, table: TableName = "samples", version: int | None = None
) -> DeltaTable | None:
    """The Delta table (its current version unless ``version``), or None if not created.

    Raises:
        ManifestError: the table's log is unreadable (a corrupt commit file), or
            ``version`` does not exist.
    """
    uri, options = location(store, table)
    try:
        return DeltaTable(uri, version=version, storage_options=options)
    except TableNotFoundError:
        return None
    except DeltaError as e:
        raise ManifestError(f"{uri}: cannot read the table: {first_line(e)}") from e
    except OSError as e:
        raise StoreError(f"{uri}: {first_line(e)}") from e


def arrow_dataset(store: Store, dt: DeltaTable, table: TableName) -> ds.Dataset:
    """The table's current files as a pyarrow dataset read through pyarrow's own file
    system: deltalake's default (a Python file handler) aborts the interpreter at exit now
    and then ("terminate called without an active exception", deltalake 1.6, pyarrow 26)."""
    if isinstance(store, S3Store):
        base = f"{store.bucket}/{store.prefix}/{_DIRS[table]}".replace("//", "/")
        filesystem = pafs.SubTreeFileSystem(base, store.arrow_filesystem())
    else:
        root = store.root / _DIRS[table]  # type: ignore[attr-defined]
        filesystem = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    return dt.to_pyarrow_dataset(filesystem=filesystem)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def has_table(store: Store, table: TableName = "samples") -> bool:
    """Whether the Delta table exists: one or two HEAD requests, not a table load."""
    log_dir = f"{_DIRS[table]}/_delta_log/"
    return store.exists(log_dir + "00000000000000000000.json") or store.exists(
        log_dir + "_last_checkpoint"  # the first commit file may be cleaned up by then
    )


def is_legacy(store: Store) -> bool:
    """A dataset written before the table format (hive Parquet parts, no Delta log)."""
    return not has_table(store) and bool(legacy_parts(store, "samples"))


def legacy_parts(store: Store, table: TableName) -> list[str]:
    return [
        p
        for p in store.list(_DIRS[table] + "/")
        if p.endswith(".parquet") and "/batch=" in p and "_delta_log" not in p
    ]


def _partitioning() -> ds.Partitioning:
    # Explicit string types: a batch called "2024" must not be read back as an integer.
    return ds.partitioning(
        pa.schema([("dataset", pa.string()), ("batch", pa.string())]), flavor="hive"
    )


def legacy_dataset(store: Store, table: TableName) -> ds.Dataset:
    sub = _DIRS[table]
    if isinstance(store, S3Store):
        filesystem: Any = store.arrow_filesystem()
        base = f"{store.bucket}/{store.prefix}/{sub}".replace("//", "/")
    else:
        filesystem, base = None, str(store.root / sub)  # type: ignore[attr-defined]
    return ds.dataset(
        base,
        format="parquet",
        partitioning=_partitioning(),
        filesystem=filesystem,
        schema=_SCHEMAS[table],
        exclude_invalid_files=False,
        ignore_prefixes=[".", "_"],
    )


def open_dataset(
    store: Store, table: TableName = "samples", version: int | None = None
) -> ds.Dataset | None:
    """The manifest (or quarantine) as a pyarrow dataset, or None if nothing is committed."""
    dt = open_table(store, table, version)
    if dt is not None:
        return arrow_dataset(store, dt, table)
    if legacy_parts(store, table):
        return legacy_dataset(store, table)
    return None


# --- Reading ---------------------------------------------------------------------------


def read(
    store: Store,
    where: str | None = None,
    columns: Sequence[str] | None = None,
    table: TableName = "samples",
    *,
    version: int | None = None,
    new_ok: bool = False,
) -> pa.Table:
    """Read the manifest (or quarantine) table, filtered by a ``--where`` expression.

    Samples: one row per image, with its latest labels (``version``: as the table was at
    that Delta version). Quarantine: only the rows of committed batches. ``new_ok``: a
    location that is not a dataset yet reads as empty (ingest, about to write its first
    batch there).

    Raises:
        ManifestError: an unknown column, a malformed expression, a corrupt table, or
            ``store`` is not a dataset (neither settings nor manifest).
    """
    schema = _SCHEMAS[table]
    wanted = list(columns) if columns else schema.names
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise ManifestError(f"unknown column(s) {unknown}; columns: {', '.join(schema.names)}")
    dt = open_table(store, table, version)
    legacy = dt is None
    if dt is not None:
        dataset = arrow_dataset(store, dt, table)
    elif legacy_parts(store, table):
        dataset = legacy_dataset(store, table)
    else:
        if not new_ok:
            require_dataset(store)
        return schema.empty_table().select(wanted)
    expr = parse_where(where, schema) if where else None
    if table == "quarantine":
        expr = _and(expr, _committed_filter(store))
    needed = list(wanted)
    if table == "samples" and legacy:
        needed += [c for c in _VERSION_COLUMNS if c not in needed]
    try:
        if legacy:
            result = dataset.to_table(filter=expr, columns=needed)
        else:
            # Filtered in memory: files a Delta MERGE wrote hold string_view columns, which
            # pyarrow's scan filters cannot compare with a string (pyarrow 26, delta-rs 1.6).
            result = scan(dataset, schema)
            if expr is not None:
                result = result.filter(expr)
            result = result.select(needed)
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:  # parse_where missed a case
        raise ManifestError(f"--where {where!r}: {first_line(e)}") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{store.url}: a manifest file is unreadable: {first_line(e)}") from e
    if table == "samples" and legacy:
        result = latest_labels(dataset, result).select(wanted)
    result = result.cast(pa.schema([schema.field(c) for c in result.column_names]))
    first = "key" if table == "samples" else "source"
    order = [(c, "ascending") for c in ("dataset", first) if c in result.column_names]
    return result.sort_by(order) if order else result


def scan(dataset: ds.Dataset, schema: pa.Schema) -> pa.Table:
    """Every row of a Delta table's dataset, with the manifest's columns and types (a
    column the table predates reads as null)."""
    table = dataset.to_table(columns=[c for c in schema.names if c in dataset.schema.names])
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def require_dataset(store: Store) -> None:
    """Nothing committed is fine for a dataset whose first batch is under way, not for a
    folder that was never one (a typo, the wrong level of a path)."""
    if not (
        store.exists(layout.SETTINGS_FILE)
        or store.list(layout.MANIFEST_DIR + "/")
        or store.list(layout.SHARDS_DIR + "/")  # a first batch under way, or interrupted
    ):
        raise ManifestError(
            f"{store.url} is not a pneumo dataset (no {layout.SETTINGS_FILE}, no "
            f"{layout.MANIFEST_DIR}/): give the --out folder or s3:// prefix of `pneumo ingest`"
        )


_VERSION_COLUMNS = ("dataset", "image_id", "labels_version")


def _and(a: ds.Expression | None, b: ds.Expression) -> ds.Expression:
    return b if a is None else a & b


def _committed_filter(store: Store) -> ds.Expression:
    """Rows of committed batches (quarantine rows wait for their batch's commit)."""
    by_dataset: dict[str, list[str]] = {}
    for name, batch in sorted(committed_parts(store)):
        by_dataset.setdefault(name, []).append(batch)
    expr = ds.scalar(False)
    for name, batches in by_dataset.items():
        expr = expr | ((ds.field("dataset") == name) & ds.field("batch").isin(batches))
    return expr


def latest_labels(dataset: ds.Dataset, rows: pa.Table) -> pa.Table:
    """Legacy datasets kept every labels version as a row: keep each image's latest."""
    every = dataset.to_table(columns=list(_VERSION_COLUMNS))
    versions = pc.fill_null(every.column("labels_version"), 1)
    counts = every.set_column(2, "labels_version", versions).group_by(["dataset", "image_id"])
    groups = counts.aggregate([("labels_version", "max"), ("labels_version", "count")])
    relabelled = groups.filter(pc.field("labels_version_count") > 1)
    if relabelled.num_rows == 0:
        return rows
    latest = {
        (d, i): v
        for d, i, v in zip(
            relabelled.column("dataset").to_pylist(),
            relabelled.column("image_id").to_pylist(),
            relabelled.column("labels_version_max").to_pylist(),
            strict=True,
        )
    }
    keep = [
        latest.get((d, i), v or 1) == (v or 1)
        for d, i, v in zip(
            rows.column("dataset").to_pylist(),
            rows.column("image_id").to_pylist(),
            rows.column("labels_version").to_pylist(),
            strict=True,
        )
    ]
    return rows.filter(pa.array(keep, pa.bool_()))


def transaction_id(dataset: str, batch: str) -> str:
    """The Delta ``app_id`` a batch commits under."""
    return f"{dataset}/{batch}"


def committed_batches(store: Store, dataset: str) -> set[str]:
    """Names of the committed batches of ``dataset``."""
    return {batch for name, batch in committed_parts(store) if name == dataset}


def committed_parts(store: Store) -> set[tuple[str, str]]:
    """(dataset, batch) of every committed batch: its rows' Delta transaction is in the
    table (legacy datasets: its manifest part exists)."""
    dt = open_table(store)
    if dt is None:
        return legacy_committed(store)
    out = set()
    for dataset, batch in layout.recorded_batches(store.list(layout.BATCHES_DIR + "/")):
        if dt.transaction_version(transaction_id(dataset, batch)) is not None:
            out.add((dataset, batch))
    return out | _legacy_committed_in_table(store)


def legacy_committed(store: Store) -> set[tuple[str, str]]:
    out = set()
    for path in legacy_parts(store, "samples"):
        parts = path.split("/")
        if len(parts) == 4 and parts[1].startswith("dataset=") and parts[2].startswith("batch="):
            out.add((parts[1][len("dataset=") :], parts[2][len("batch=") :]))
    return out


def _legacy_committed_in_table(store: Store) -> set[tuple[str, str]]:
    """Batches a conversion carried into the table (recorded in its first commit)."""
    batches = settings_value(store, "converted_batches") or []
    return {(d, b) for d, b in batches}


def fingerprint(table: pa.Table) -> str:
    """A short hash naming exactly which samples (and which bytes) a table selects."""
    h = hashlib.sha256()
    keys = table.select(["dataset", "key", "content_sha256"]).sort_by("key").to_pylist()
    for row in keys:
        h.update(f"{row['dataset']}/{row['key']}/{row['content_sha256']}\n".encode())
    return h.hexdigest()[:16]


def read_settings(store: Store) -> dict[str, Any] | None:
    """``_pneumo.json``, or None before the first batch.

    Raises:
        ManifestError: the file is not JSON (damaged).
    """
    if not store.exists(layout.SETTINGS_FILE):
        return None
    try:
        return json.loads(store.get(layout.SETTINGS_FILE))
    except ValueError as e:
        raise ManifestError(f"{store.url_of(layout.SETTINGS_FILE)} is damaged: {e}") from e


def write_settings(store: Store, settings: dict[str, Any]) -> None:
    data = json.dumps(settings, indent=2, sort_keys=True).encode()
    store.put(layout.SETTINGS_FILE, data)


def settings_value(store: Store, name: str) -> Any:
    return (read_settings(store) or {}).get(name)


def create_settings(store: Store, settings: dict[str, Any]) -> bool:
    """Write the dataset's settings unless they exist; True if this call wrote them
    (of any number of first batches starting at once, exactly one does)."""
    data = json.dumps(settings, indent=2, sort_keys=True).encode()
    return store.put_if_absent(layout.SETTINGS_FILE, data)
