"""An independent reader of what pneumo stores: the Delta log replayed by hand, the tars
opened with :mod:`tarfile`. It shares no code with ``pneumo.shards`` beyond the store's
get/list, so a bug in the manifest code cannot hide itself from the tests that use it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def current_rows(store: Any, table: str = "manifest") -> list[dict[str, Any]]:
    """The rows of the table's latest version: replay ``_delta_log/*.json`` (add and
    remove actions, in version order) and read the files left, with their partition values."""
    logs = sorted(p for p in store.list(f"{table}/_delta_log/") if p.endswith(".json"))
    files: dict[str, dict[str, Any]] = {}
    for path in logs:
        for line in store.get(path).decode().splitlines():
            action = json.loads(line)
            if "add" in action:
                files[action["add"]["path"]] = action["add"].get("partitionValues") or {}
            elif "remove" in action:
                files.pop(action["remove"]["path"], None)
    rows: list[dict[str, Any]] = []
    for name, partitions in sorted(files.items()):
        data = pq.read_table(io.BytesIO(store.get(f"{table}/{name}")))
        for column, value in partitions.items():
            data = data.append_column(column, pa.array([value] * data.num_rows, pa.string()))
        rows.extend(data.to_pylist())
    return rows


def check_samples(store: Any, rows: list[dict[str, Any]]) -> list[str]:
    """Problems found opening every row's sample in its shard: the shard is missing, the
    image member is missing, or its bytes do not hash to ``content_sha256``."""
    problems = []
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    for shard, members in sorted(by_shard.items()):
        if not store.exists(shard):
            problems.extend(f"{shard}: missing (key {r['key']})" for r in members)
            continue
        images = {}
        with tarfile.open(fileobj=io.BytesIO(store.get(shard))) as tar:
            for info in tar.getmembers():
                key, _, ext = info.name.partition(".")
                if ext in ("jpg", "png", "npy"):
                    images[key] = hashlib.sha256(tar.extractfile(info).read()).hexdigest()
        for row in members:
            if images.get(row["key"]) != row["content_sha256"]:
                problems.append(f"{shard}: sample {row['key']} missing or altered")
    return problems
