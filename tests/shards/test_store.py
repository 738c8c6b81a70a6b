"""The two stores behave the same: a local folder and S3 through a loopback server."""

from __future__ import annotations

import pytest

from shards.errors import StoreError
from shards.store import open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"{bucket}/some/prefix")


def test_put_get_list_delete(store, tmp_path):
    store.put("a/b/one.bin", b"1" * 10)
    local = tmp_path / "two.bin"
    local.write_bytes(b"2" * 20)
    store.put_file("a/two.bin", local)
    assert local.exists()
    store.move_file("c/three.bin", local)
    assert not local.exists()
    assert store.list("a/") == ["a/b/one.bin", "a/two.bin"]
    assert store.list() == ["a/b/one.bin", "a/two.bin", "c/three.bin"]
    assert store.get("a/two.bin") == b"2" * 20
    with store.open_read("a/b/one.bin") as f:
        assert f.read(4) == b"1111"
    assert store.exists("c/three.bin") and not store.exists("c/none.bin")
    store.delete("c/three.bin")
    assert not store.exists("c/three.bin")
    with pytest.raises(StoreError):
        store.get("c/three.bin")
    with pytest.raises(StoreError, match="leaves the store root"):
        store.put("../escape", b"x")


def test_a_large_put_goes_up_in_parts(s3_bucket, monkeypatch, tmp_path):
    import shards.store as st

    monkeypatch.setattr(st, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(st, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    store = open_store(f"{s3_bucket}/big")
    data = bytes(range(256)) * (12 * 1024 * 1024 // 256)
    store.put("x.bin", data)
    head = store.client.head_object(Bucket=store.bucket, Key="big/x.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: 3 parts
    assert store.get("x.bin") == data


def test_unreachable_or_missing_bucket_is_one_clear_error(s3_endpoint):
    with pytest.raises(StoreError, match="no-such-bucket"):
        open_store("s3://no-such-bucket/x")
    with pytest.raises(StoreError, match="names no bucket"):
        open_store("s3:///x")


def test_a_dropped_connection_resumes_with_a_ranged_get(s3_bucket, monkeypatch):
    from urllib3.exceptions import ProtocolError

    store = open_store(f"{s3_bucket}/r")
    data = bytes(range(256)) * 4096  # 1 MiB
    store.put("obj.bin", data)
    real_get = store.client.get_object
    ranges = []

    class Flaky:
        """A body that breaks after 300 kB, the first time only."""

        def __init__(self, body):
            self.body, self.sent = body, 0

        def read(self, n=-1):
            if not ranges and self.sent > 300_000:
                raise ProtocolError("connection reset")
            chunk = self.body.read(n)
            self.sent += len(chunk)
            return chunk

        def close(self):
            self.body.close()

    def get_object(**kw):
        response = real_get(**kw)
        if "Range" in kw:
            ranges.append(kw["Range"])
            return response
        return {**response, "Body": Flaky(response["Body"])}

    monkeypatch.setattr(store.client, "get_object", get_object)
    with store.open_read("obj.bin") as f:
        got = b"".join(iter(lambda: f.read(65536), b""))
    assert got == data
    assert len(ranges) == 1 and ranges[0].startswith("bytes=3")
