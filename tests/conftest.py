"""Shared fixtures: the real data in ../shared/data and an S3 protocol server on loopback.

The S3 fixtures start moto's ThreadedMotoServer on 127.0.0.1, unless AWS_ENDPOINT_URL
already points at a server (a MinIO from infra/, say): then the same tests run against it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

SHARED_DATA = Path(
    os.environ.get("PNEUMO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
_S3_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the real test data is missing: {SHARED_DATA} (set PNEUMO_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3 endpoint URL, with credentials in the environment for boto3 and pneumo."""
    saved = {k: os.environ.get(k) for k in _S3_VARS}
    server = None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://{host}:{port}",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        if server is not None:
            server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket for one test, as ``s3://name``."""
    import boto3

    name = f"pneumo-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def run_pneumo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real ``pneumo`` command (``python -m pneumo``) and capture its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "pneumo", *args], capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pneumo {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def pneumo() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_pneumo


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_shards(
    root: Path,
    rows: list[dict[str, Any]],
    members_of: Callable[[dict[str, Any]], dict[str, bytes]],
    *,
    per_shard: int,
    one_shard: bool,
    batch: str = "b0",
    dataset: str = "siim",
) -> None:
    """A dataset written directly (no ingest): ``rows`` (manifest values; ``shard`` and
    ``batch`` are filled in; their ``dataset`` must be ``dataset``) in shards grouped by
    split and label of ``per_shard`` samples, or all in one shard."""
    from shards import layout, manifest
    from shards.store import open_store
    from shards.tario import ShardWriter

    store = open_store(str(root))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        group = ("all", "mix") if one_shard else (row["split"], layout.label_group(row["has_ptx"]))
        groups.setdefault(group, []).append(row)
    with tempfile.TemporaryDirectory() as tmp:
        for (split, group), grouped in sorted(groups.items()):
            for start in range(0, len(grouped), per_shard):
                path = layout.shard_path(dataset, batch, split, group, start // per_shard)
                writer = ShardWriter(path, tmp)
                for row in grouped[start : start + per_shard]:
                    writer.write({"__key__": row["key"], **members_of(row)})
                    row.update(shard=path, batch=batch)
                store.move_file(path, writer.close().tmp_path)
    manifest.write_part(store, layout.manifest_part(dataset, batch), manifest.to_table(rows))


@pytest.fixture(scope="session")
def write_shards() -> Callable[..., None]:
    return _write_shards
