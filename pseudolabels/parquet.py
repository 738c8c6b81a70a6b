"""Parquet datasets at a URL (a folder or ``s3://bucket/prefix``): embeddings, label tables.

Such a folder holds Parquet parts and, beside them, files whose names start with ``_``
(``_embed.json``, ``_clusters.json``, plots): pyarrow's dataset discovery skips those names,
as it skips Hive's ``_SUCCESS``, so plain ``pyarrow.dataset.dataset(URL)`` opens the table.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pneumo.shards.errors import ManifestError
from pneumo.shards.s3 import S3Store
from pneumo.shards.store import LocalStore, Store, open_store


def open_parquet(url: str) -> ds.Dataset:
    """The Parquet dataset at ``url``.

    Raises:
        StoreError: the folder or bucket cannot be reached.
        ManifestError: it holds no Parquet part.
    """
    store = open_store(url, create=False)
    parts = [p for p in store.list() if p.endswith(".parquet") and not p.startswith("_")]
    if not parts:
        raise ManifestError(f"{store.url} holds no Parquet part (*.parquet)")
    if isinstance(store, S3Store):
        filesystem: Any = store.arrow_filesystem()
        base = f"{store.bucket}/{store.prefix}".rstrip("/")
    elif isinstance(store, LocalStore):
        filesystem, base = None, str(store.root)
    else:
        raise ManifestError(f"unsupported store {store.url}")
    return ds.dataset(base, format="parquet", filesystem=filesystem)


def read_json(store: Store, path: str) -> dict[str, Any] | None:
    """A JSON file of the store, or None when there is none."""
    if not store.exists(path):
        return None
    return json.loads(store.get(path))


def write_json(store: Store, path: str, obj: Any) -> None:
    store.put(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def vectors(table: pa.Table, column: str, source: str) -> np.ndarray:
    """A list column of equal-length numeric lists as an ``[rows, dim]`` float32 array.

    Raises:
        ManifestError: the column is missing, not a list, of unequal lengths, or has nulls
            or non-finite values.
    """
    if column not in table.column_names:
        raise ManifestError(f"{source} has no {column!r} column (columns: {table.column_names})")
    array = table.column(column).combine_chunks()
    if not (pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type)):
        raise ManifestError(f"{source}: column {column!r} is {array.type}, not a list of numbers")
    if array.null_count:
        raise ManifestError(f"{source}: {array.null_count} row(s) have no {column}")
    lengths = np.asarray(pc.list_value_length(array))
    if len(lengths) and (lengths != lengths[0]).any():
        row = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ManifestError(
            f"{source}: row {row} has a {column} of {lengths[row]} values, row 0 has {lengths[0]}"
        )
    dim = int(lengths[0]) if len(lengths) else 0
    flat = np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    out = flat.reshape(len(array), dim)
    bad = ~np.isfinite(out).all(1)
    if bad.any():
        raise ManifestError(
            f"{source}: row {int(np.flatnonzero(bad)[0])} has a non-finite {column}"
        )
    return out


def fingerprint(keys: Sequence[str], matrix: np.ndarray) -> str:
    """A short hash of keys and their vectors (in the order given)."""
    h = hashlib.sha256()
    h.update("\n".join(keys).encode())
    h.update(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]
