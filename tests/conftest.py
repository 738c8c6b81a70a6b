"""Shared fixtures: the real sample files and an S3 protocol server on loopback.

``shared_data`` is the full sample set (../shared/data or $PNEUMO_SHARED_DATA) or, in a
fresh clone, the part of it committed in tests/data (tests/sample_data.py says how a test
that needs a file tests/data lacks is skipped, and counted in one line at the end).

The S3 fixtures start moto's ThreadedMotoServer on 127.0.0.1, unless AWS_ENDPOINT_URL
already points at a server (a MinIO from infra/, say): then the same tests run against it,
with the credentials boto3 finds the standard way (AWS_ACCESS_KEY_ID, ... or a profile), in
buckets named for this run and deleted at the end.
"""

from __future__ import annotations

import hashlib
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
import sample_data

# The small datasets of real chest X-rays (session fixtures), read by the training,
# pseudo-label and benchmark tests alike.
pytest_plugins = ["stream_datasets"]

_S3_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def pytest_configure(config: pytest.Config) -> None:
    # Tests never touch the network: albumentations would ask the package index at import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    wanted = os.environ.get("PNEUMO_SHARED_DATA")
    if wanted and not Path(wanted).is_dir():
        raise pytest.UsageError(f"PNEUMO_SHARED_DATA={wanted} is not a folder")


def pytest_report_header(config: pytest.Config) -> str:
    full = sample_data.full_set()
    if full is not None:
        return f"sample data: {full} (the full set)"
    return f"sample data: {sample_data.COMMITTED} (part of the full set: see its PROVENANCE.md)"


def pytest_collection_finish(session: pytest.Session) -> None:
    sample_data.collection_done = True


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line for every test skipped for want of a sample file (never one line per test)."""
    skipped = {
        report.nodeid
        for report in terminalreporter.stats.get("skipped", [])
        if isinstance(report.longrepr, tuple) and sample_data.SKIP_REASON in report.longrepr[2]
    }
    if skipped:
        terminalreporter.write_line(
            f"sample data: {len(skipped)} tests skipped: they need files of the full sample set "
            "that tests/data does not carry; put it at ../shared/data or set "
            "PNEUMO_SHARED_DATA=DIR to run them (tests/data/PROVENANCE.md says where it comes from)"
        )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample files: the full set, or the part of it in tests/data."""
    return sample_data.root()


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


class Buckets:
    """Buckets made for this run, with names no other run uses (a MinIO outlives runs), and
    deleted with everything in them when their test or the session ends."""

    def __init__(self, endpoint: str) -> None:
        import boto3

        self.client = boto3.client("s3", endpoint_url=endpoint)
        self.run = uuid.uuid4().hex[:8]
        self.names: list[str] = []

    def new(self) -> str:
        name = f"pneumo-test-{self.run}-{len(self.names):03d}"
        region = self.client.meta.region_name
        extra = {}
        if region and region != "us-east-1":  # S3's rule; MinIO takes either
            extra = {"CreateBucketConfiguration": {"LocationConstraint": region}}
        self.client.create_bucket(Bucket=name, **extra)
        self.names.append(name)
        return name

    def delete(self, name: str) -> None:
        """Empty the bucket (objects, unfinished multipart uploads), then delete it."""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        for upload in self.client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            self.client.abort_multipart_upload(
                Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        self.client.delete_bucket(Bucket=name)
        self.names.remove(name)


@pytest.fixture(scope="session")
def s3_buckets(s3_endpoint: str) -> Iterator[Buckets]:
    """Makes buckets (``s3_buckets.new()``); whatever is left is deleted at the end."""
    buckets = Buckets(s3_endpoint)
    yield buckets
    for name in list(buckets.names):
        buckets.delete(name)


@pytest.fixture
def s3_bucket(s3_buckets: Buckets) -> Iterator[str]:
    """A fresh bucket for one test, as ``s3://name``; deleted after it."""
    name = s3_buckets.new()
    yield f"s3://{name}"
    s3_buckets.delete(name)


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
    """A dataset written directly (no ingest): ``rows`` (manifest values; ``shard``,
    ``batch``, ``offset``, ``size`` and ``content_sha256`` are filled in; their ``dataset``
    must be ``dataset``) in shards grouped by split and label of ``per_shard`` samples, or
    all in one shard. The stream checks every image against its hash, as with an ingest."""
    from pneumo.shards import commits, layout, manifest
    from pneumo.shards.store import open_store
    from pneumo.shards.tario import ShardWriter

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
                    members = members_of(row)
                    offset, size = writer.write({"__key__": row["key"], **members})
                    row.update(shard=path, batch=batch, offset=offset, size=size)
                    image = members.get("jpg", members.get("png"))
                    if image is not None:
                        row["content_sha256"] = hashlib.sha256(image).hexdigest()
                store.move_file(path, writer.close().tmp_path)
    commits.commit(store, manifest.to_table(rows), dataset=dataset, batch=batch)


@pytest.fixture(scope="session")
def write_shards() -> Callable[..., None]:
    return _write_shards


@pytest.fixture(scope="session", autouse=True)
def isolated_patient_secret(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests never read or create the user's own patient secret: ingest (in-process or
    through ``pneumo``) gets a fixed test secret (the same splits on every run) and a config
    folder of the session's."""
    saved = {k: os.environ.get(k) for k in ("XDG_CONFIG_HOME", "PNEUMO_PATIENT_KEY")}
    config = tmp_path_factory.mktemp("config")
    os.environ["XDG_CONFIG_HOME"] = str(config)
    os.environ["PNEUMO_PATIENT_KEY"] = "pneumo-test-suite-secret-not-for-real-data"
    try:
        yield config
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
