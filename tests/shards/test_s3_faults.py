"""S3 through a faulty network: every client path (boto3, pyarrow, deltalake) retries
throttling and dropped connections; refused credentials are one line; the endpoint may come
from the AWS config file alone. The faults come from tests/faults.py, a proxy in front of
the loopback S3 server."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pneumo.shards.errors import StoreError
from pneumo.shards.s3 import S3Store
from pneumo.shards.store import open_store

pytestmark = pytest.mark.integration


def _store(bucket: str, prefix: str = "f") -> S3Store:
    store = open_store(f"{bucket}/{prefix}")
    assert isinstance(store, S3Store)
    return store


@pytest.mark.slow
def test_store_operations_survive_30_percent_faults(proxy, s3_bucket):
    store = _store(s3_bucket)
    kinds = ("put", "get", "range_get", "head", "list", "put_if_absent", "delete")
    for kind in kinds:  # the first request of every kind fails, whatever the dice say
        proxy.add("reset", kinds={kind}, nth=1)
    proxy.add("503", rate=0.15)  # SlowDown, before the server sees the request
    proxy.add("reset", rate=0.18)  # 0.15 + 0.85 * 0.18: 30% of requests fail
    proxy.add("cut", kinds={"get", "range_get"}, rate=0.2)  # bodies cut off half-way
    blobs = {f"d/{i:02d}.bin": os.urandom(20_000 + i) for i in range(12)}
    for path, data in blobs.items():
        store.put(path, data)
    for path, data in blobs.items():
        assert store.get(path) == data
        with store.open_range(path, 100, 15_100) as f:
            assert f.read() == data[100:15_100]
    assert store.list("d/") == sorted(blobs)
    assert store.exists("d/00.bin") and not store.exists("d/none.bin")
    assert store.put_if_absent("lease", b"mine") is True
    assert store.put_if_absent("lease", b"theirs") is False
    assert store.get("lease") == b"mine"
    store.delete("d/00.bin")
    assert not store.exists("d/00.bin")
    failed = sum(proxy.count(outcome=o) for o in ("503", "reset", "cut"))
    assert failed >= 0.25 * proxy.count()  # the premise: the faults really happened
    for kind in kinds:
        assert proxy.count(kind) > proxy.count(kind, "ok"), f"no fault on {kind}"


def test_a_conditional_put_whose_answer_was_lost_still_wins(proxy, s3_bucket):
    """The server created the object but the answer never came: the retry finds it there
    (412), and only the bytes tell whose it is."""
    store = _store(s3_bucket)
    proxy.add("reset_after", kinds={"put_if_absent"}, nth=1)
    assert store.put_if_absent("lease", b"writer-1") is True
    proxy.add("reset_after", kinds={"put_if_absent"}, nth=1)  # counts from here
    assert store.put_if_absent("lease", b"writer-2") is False  # a retry, but not its object
    assert store.get("lease") == b"writer-1"
    assert proxy.count("put_if_absent", "reset_after") == 2


def test_refused_credentials_are_one_line_and_renewed_ones_are_used(proxy, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "old-key")
    store = _store(s3_bucket)
    store.put("x", b"x")
    proxy.add("expired", access_key="old-key")  # its token expires: every request refused
    with pytest.raises(StoreError) as err:
        store.get("x")
    line = str(err.value)
    assert "\n" not in line and "ExpiredToken" in line and "renew the credentials" in line
    assert f"{store.url}/x" in line
    # Rewritten credentials (a token refresher's): the store asks boto3 again and goes on.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "new-key")
    assert store.get("x") == b"x"
    store.put("y", b"y")
    assert store.session.get_credentials().access_key == "new-key"


@pytest.mark.slow
def test_the_arrow_filesystem_survives_20_percent_faults(proxy, s3_bucket):
    store = _store(s3_bucket)
    fs = store.arrow_filesystem()
    base = f"{store.bucket}/{store.prefix}/parts"
    for i in range(6):
        with fs.open_output_stream(f"{base}/batch=b{i}/part-0.parquet") as f:
            pq.write_table(pa.table({"key": [f"{i}-{j}" for j in range(500)], "i": [i] * 500}), f)
    # One part read 3 times in a row throttled (the AWS SDK's default gives up), then
    # 20% SlowDown: pyarrow's own reads failed 24 of 40 such reads (see shards/s3_tables.py).
    proxy.add("503", kinds={"get", "range_get"}, key_contains="batch=b0/", times=3)
    proxy.add("503", rate=0.2)
    proxy.add("reset", rate=0.05)
    for _ in range(3):
        dataset = ds.dataset(base, filesystem=fs, format="parquet", partitioning="hive")
        assert dataset.to_table().num_rows == 3000
    assert proxy.count("range_get", "503") >= 2 and proxy.count(outcome="503") >= 5


def test_a_delta_table_written_and_read_through_20_percent_faults(proxy, s3_bucket):
    deltalake = pytest.importorskip("deltalake")
    store = _store(s3_bucket)
    proxy.add("503", rate=0.2)
    proxy.add("reset", kinds={"get", "range_get", "list"}, rate=0.05)
    proxy.add("503", kinds={"put_if_absent"}, times=3)  # the first commit: 4 attempts
    uri = store.table_uri("manifest")
    for i in range(3):
        batch = pa.table({"image_id": [f"{i}-{j}" for j in range(10)], "n": [i] * 10})
        deltalake.write_deltalake(uri, batch, mode="append", storage_options=store.delta_options())
    table = deltalake.DeltaTable(uri, storage_options=store.delta_options())
    assert table.version() == 2  # three commits, none doubled by a retry
    ids = table.to_pyarrow_table().column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 30
    assert proxy.count("put_if_absent", "503") >= 3 and proxy.count(outcome="503") >= 6


@pytest.mark.parametrize("where", ["profile", "services"])
def test_an_endpoint_set_only_in_the_aws_config_file(
    where, s3_endpoint, s3_bucket, tmp_path, monkeypatch
):
    """boto3 >= 1.28 reads ``endpoint_url`` from the config file; pneumo then uses it on
    every path, path-style (``localhost``: virtual-hosted ``bucket.localhost`` would not
    resolve)."""
    if not s3_endpoint.startswith("http://127.0.0.1:"):
        pytest.skip("needs the loopback server")
    endpoint = s3_endpoint.replace("127.0.0.1", "localhost")
    config = tmp_path / "aws-config"
    if where == "profile":
        config.write_text(f"[default]\nendpoint_url = {endpoint}\n")
    else:
        config.write_text(
            f"[default]\nservices = local\n\n[services local]\ns3 =\n  endpoint_url = {endpoint}\n"
        )
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    store = _store(s3_bucket, "cfg")
    assert store.settings.endpoint_url is None and store.endpoint_url == endpoint
    store.put("a/x", b"boto3")  # boto3
    assert store.list("a/") == ["a/x"] and store.get("a/x") == b"boto3"
    fs = store.arrow_filesystem()  # pyarrow
    with fs.open_output_stream(f"{store.bucket}/cfg/p/part.parquet") as f:
        pq.write_table(pa.table({"v": [1, 2]}), f)
    assert store.exists("p/part.parquet")
    assert ds.dataset(f"{store.bucket}/cfg/p", filesystem=fs).to_table().num_rows == 2
    deltalake = pytest.importorskip("deltalake")  # deltalake
    uri = store.table_uri("t")
    deltalake.write_deltalake(uri, pa.table({"v": [3]}), storage_options=store.delta_options())
    assert any(p.startswith("t/_delta_log/") for p in store.list("t/"))
    assert deltalake.DeltaTable(uri, storage_options=store.delta_options()).to_pyarrow_table()[
        "v"
    ].to_pylist() == [3]


def test_an_unreachable_endpoint_is_one_line():
    from botocore.exceptions import EndpointConnectionError

    from pneumo.shards.s3 import _store_error

    e = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")
    line = str(_store_error(e, "cannot read s3://b/k", "http://127.0.0.1:9"))
    assert line.startswith("cannot read s3://b/k: cannot reach the object store at")
    assert "\n" not in line
