"""The Parquet manifest: one row per stored sample, one part file per committed batch.

A batch becomes visible only when its manifest part exists: shards are written first and
the part last, in one atomic put. The manifest is a hive-partitioned Parquet dataset, so
plain pyarrow opens it, locally or on S3::

    pyarrow.dataset.dataset("DATASET/manifest", format="parquet", partitioning="hive")

The quarantine table (inputs that could not be ingested, with the reason) has the same
layout under ``DATASET/quarantine/``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from shards import layout
from shards.errors import ManifestError
from shards.query import parse_where
from shards.s3 import S3Store
from shards.store import LocalStore, Store

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
        ("image_format", pa.string()),  # "jpeg" (source frame as-is) | "png"
        ("bit_depth", pa.int8()),  # 8 | 16
        ("transfer_syntax", pa.string()),  # source DICOM transfer syntax; "png" for NIH
        ("findings", pa.list_(pa.string())),  # NIH findings; SIIM: ["Pneumothorax"] or []
        ("n_boxes", pa.int16()),  # NIH bounding boxes kept with the sample
    ],
    metadata={"pneumo.schema_version": str(layout.SCHEMA_VERSION)},
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # file path or "labels.csv:LINE"
        ("reason", pa.string()),
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
    """Write one Parquet part atomically (readers see all of it or none)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put(path, buf.getvalue())


def _partitioning() -> ds.Partitioning:
    # Explicit string types: a batch called "2024" must not be read back as an integer.
    return ds.partitioning(
        pa.schema([("dataset", pa.string()), ("batch", pa.string())]), flavor="hive"
    )


def open_dataset(store: Store, table: TableName = "samples") -> ds.Dataset | None:
    """The manifest (or quarantine) as a pyarrow dataset, or None if nothing is committed."""
    sub = _DIRS[table]
    if not store.list(sub + "/"):
        return None
    if isinstance(store, S3Store):
        filesystem: Any = store.arrow_filesystem()
        base = f"{store.bucket}/{store.prefix}/{sub}".replace("//", "/")
    elif isinstance(store, LocalStore):
        filesystem, base = None, str(store.root / sub)
    else:
        raise ManifestError(f"unsupported store {store.url}")
    return ds.dataset(
        base,
        format="parquet",
        partitioning=_partitioning(),
        filesystem=filesystem,
        schema=_SCHEMAS[table],
    )


def read(
    store: Store,
    where: str | None = None,
    columns: Sequence[str] | None = None,
    table: TableName = "samples",
) -> pa.Table:
    """Read the manifest (or quarantine) table, filtered by a ``--where`` expression.

    Raises:
        ManifestError: an unknown column or a malformed expression.
    """
    schema = _SCHEMAS[table]
    if columns:
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise ManifestError(f"unknown column(s) {unknown}; columns: {', '.join(schema.names)}")
    dataset = open_dataset(store, table)
    if dataset is None:
        return schema.empty_table().select(list(columns) if columns else schema.names)
    expr = parse_where(where, schema) if where else None
    result = dataset.to_table(filter=expr, columns=list(columns) if columns else None)
    first = "key" if table == "samples" else "source"
    order = [(c, "ascending") for c in ("dataset", first) if c in result.column_names]
    return result.sort_by(order) if order else result


def committed_batches(store: Store, dataset: str) -> set[str]:
    """Names of the batches of ``dataset`` whose manifest part exists."""
    prefix = f"{layout.MANIFEST_DIR}/dataset={dataset}/"
    out = set()
    for path in store.list(prefix):
        part = path[len(prefix) :].split("/", 1)[0]
        if part.startswith("batch="):
            out.add(part[len("batch=") :])
    return out


def fingerprint(table: pa.Table) -> str:
    """A short hash naming exactly which samples (and which bytes) a table selects."""
    h = hashlib.sha256()
    keys = table.select(["dataset", "key", "content_sha256"]).sort_by("key").to_pylist()
    for row in keys:
        h.update(f"{row['dataset']}/{row['key']}/{row['content_sha256']}\n".encode())
    return h.hexdigest()[:16]


def read_settings(store: Store) -> dict[str, Any] | None:
    if not store.exists(layout.SETTINGS_FILE):
        return None
    return json.loads(store.get(layout.SETTINGS_FILE))


def write_settings(store: Store, settings: dict[str, Any]) -> None:
    data = json.dumps(settings, indent=2, sort_keys=True).encode()
    store.put(layout.SETTINGS_FILE, data)
