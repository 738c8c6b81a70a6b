"""The Parquet manifest: one row per stored sample, one part file per committed batch.

A batch becomes visible only when its manifest part exists: shards are written first and
the part last, in one atomic put. The manifest is a hive-partitioned Parquet dataset, so
plain pyarrow opens it, locally or on S3::

    pyarrow.dataset.dataset("DATASET/manifest", format="parquet", partitioning="hive")

The quarantine table (inputs that could not be ingested, with the reason) has the same
layout under ``DATASET/quarantine/``; its rows are read only for committed batches.

New labels for stored images come as a later batch whose rows carry a higher
``labels_version``: :func:`read` returns only the latest version of each image (the old
rows stay, for history, with ``latest_labels=False``).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pneumo.shards import layout
from pneumo.shards.errors import ManifestError
from pneumo.shards.query import parse_where
from pneumo.shards.s3 import S3Store
from pneumo.shards.store import LocalStore, Store

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
        # How patient_key was made: "nih-patient-id", "nih-xref", "siim-image"... A basis
        # ending in "-image" is image-level: the image is its own patient.
        ("patient_basis", pa.string()),
        ("labels_version", pa.int16()),  # 1, then +1 for each batch that relabels the image
        ("labels_sha256", pa.string()),  # of the label rows the sample was made from
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
    *,
    latest_labels: bool = True,
    new_ok: bool = False,
) -> pa.Table:
    """Read the manifest (or quarantine) table, filtered by a ``--where`` expression.

    Samples: only the latest labels version of each image unless ``latest_labels`` is
    False. Quarantine: only the rows of committed batches. ``new_ok``: a location that is
    not a dataset yet reads as empty (ingest, about to write its first batch there).

    Raises:
        ManifestError: an unknown column, a malformed expression, or ``store`` is not a
            dataset (neither settings nor manifest).
    """
    schema = _SCHEMAS[table]
    wanted = list(columns) if columns else schema.names
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise ManifestError(f"unknown column(s) {unknown}; columns: {', '.join(schema.names)}")
    dataset = open_dataset(store, table)
    if dataset is None:
        if not new_ok:
            require_dataset(store)
        return schema.empty_table().select(wanted)
    expr = parse_where(where, schema) if where else None
    if table == "quarantine":
        expr = _and(expr, _committed_filter(store))
    needed = list(wanted)
    if table == "samples" and latest_labels:
        needed += [c for c in _VERSION_COLUMNS if c not in needed]
    try:
        result = dataset.to_table(filter=expr, columns=needed)
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:  # parse_where missed a case
        raise ManifestError(f"--where {where!r}: {str(e).splitlines()[0]}") from e
    if table == "samples" and latest_labels:
        result = _latest_labels(dataset, result).select(wanted)
    first = "key" if table == "samples" else "source"
    order = [(c, "ascending") for c in ("dataset", first) if c in result.column_names]
    return result.sort_by(order) if order else result


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
    """Rows of batches whose manifest part exists (quarantine rows wait for the commit)."""
    by_dataset: dict[str, list[str]] = {}
    for name, batch in sorted(committed_parts(store)):
        by_dataset.setdefault(name, []).append(batch)
    expr = ds.scalar(False)
    for name, batches in by_dataset.items():
        expr = expr | ((ds.field("dataset") == name) & ds.field("batch").isin(batches))
    return expr


def _latest_labels(dataset: ds.Dataset, rows: pa.Table) -> pa.Table:
    """Drop the rows of images that a later batch relabelled (a higher labels_version)."""
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


def committed_batches(store: Store, dataset: str) -> set[str]:
    """Names of the batches of ``dataset`` whose manifest part exists."""
    return {batch for name, batch in committed_parts(store) if name == dataset}


def committed_parts(store: Store) -> set[tuple[str, str]]:
    """(dataset, batch) of every committed batch: those whose manifest part exists."""
    out = set()
    for path in store.list(layout.MANIFEST_DIR + "/"):
        parts = path.split("/")
        if (
            len(parts) == 4
            and parts[1].startswith("dataset=")
            and parts[2].startswith("batch=")
            and parts[3].endswith(".parquet")
        ):
            out.add((parts[1][len("dataset=") :], parts[2][len("batch=") :]))
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
