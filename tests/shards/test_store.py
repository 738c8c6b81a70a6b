"""The two stores behave the same: a local folder and S3 through a loopback server."""

from __future__ import annotations

import os
import stat

import pytest

from pneumo.shards import layout, manifest
from pneumo.shards.errors import StoreError
from pneumo.shards.store import open_store
from pneumo.shards.tario import ShardUploader, ShardWriter


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
    import pneumo.shards.s3 as st

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

    from pneumo.shards import s3_reads

    store = open_store(f"{s3_bucket}/r")
    data = bytes(range(256)) * 4096  # 1 MiB
    store.put("obj.bin", data)
    real_open = s3_reads.open_object
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

    def open_object(store, key, headers):  # every GET, lean or the client's
        body, etag = real_open(store, key, headers)
        if "Range" in headers:
            ranges.append(headers)
            return body, etag
        return Flaky(body), etag

    monkeypatch.setattr(s3_reads, "open_object", open_object)
    with store.open_read("obj.bin") as f:
        got = b"".join(iter(lambda: f.read(65536), b""))
    assert got == data
    assert len(ranges) == 1 and ranges[0]["Range"].startswith("bytes=3")
    assert ranges[0]["If-Match"]  # pinned to the version the first bytes came from


def test_open_range_reads_exactly_the_range(store):
    data = bytes(range(256)) * 300
    store.put("blob.bin", data)
    for start, end in ((0, 1), (100, 612), (5000, len(data)), (len(data) - 3, len(data))):
        with store.open_range("blob.bin", start, end) as f:
            got = b"".join(iter(lambda f=f: f.read(1000), b""))
        assert got == data[start:end], (start, end)
    with store.open_range("blob.bin", 10, 20) as f:
        assert f.read() == data[10:20] and f.read() == b""


def test_a_ranged_read_resumes_within_its_range(s3_bucket, monkeypatch):
    from urllib3.exceptions import ProtocolError

    from pneumo.shards import s3_reads

    store = open_store(f"{s3_bucket}/r")
    data = bytes(range(256)) * 4096  # 1 MiB
    store.put("obj.bin", data)
    real_open = s3_reads.open_object
    ranges = []

    class Flaky:
        def __init__(self, body):
            self.body, self.sent = body, 0

        def read(self, n=-1):
            if len(ranges) == 1 and self.sent > 200_000:
                raise ProtocolError("connection reset")
            chunk = self.body.read(n)
            self.sent += len(chunk)
            return chunk

        def close(self):
            self.body.close()

    def open_object(store, key, headers):  # every GET, lean or the client's
        ranges.append(headers.get("Range"))
        body, etag = real_open(store, key, headers)
        return Flaky(body), etag

    monkeypatch.setattr(s3_reads, "open_object", open_object)
    with store.open_range("obj.bin", 1000, 700_000) as f:
        got = b"".join(iter(lambda: f.read(65536), b""))
    assert got == data[1000:700_000]
    resumed_at = int(ranges[1].removeprefix("bytes=").split("-")[0])
    assert ranges[0] == "bytes=1000-699999"
    assert 200_000 < resumed_at - 1000 < 700_000 and ranges[1].endswith("-699999")


# ---------------------------------------------------------------- modes and durability


@pytest.fixture
def umask():
    """Set the process umask for one test."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mask):
    umask(mask)
    store = open_store(tmp_path / "store")
    store.put("a/put.bin", b"x")
    local = tmp_path / "src.bin"
    local.write_bytes(b"y")
    store.put_file("a/put_file.bin", local)
    uploader = ShardUploader(store)
    writer = ShardWriter("shards/s.tar", store.scratch_dir())
    writer.write({"__key__": "k", "jpg": b"z"})
    uploader.submit(writer)  # a temp file renamed into place, as ingest does
    uploader.wait()
    expected = 0o666 & ~mask  # what `touch` or `open(..., "w")` gives
    for path in ("a/put.bin", "a/put_file.bin", "shards/s.tar"):
        assert stat.S_IMODE((tmp_path / "store" / path).stat().st_mode) == expected, path


def test_shards_and_their_folders_are_durable_before_the_manifest_commits(tmp_path, monkeypatch):
    """Every fsync and rename, in order: a shard's data, its folder entry and every folder
    created for it reach the disk before the manifest part that names it is renamed in."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    store = open_store(tmp_path / "ds")
    root = str(store.root)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    uploader = ShardUploader(store)
    shard_paths = [layout.shard_path("siim", "b0", "train", g, 0) for g in ("neg", "pos")]
    temps = {}
    for path in shard_paths:
        writer = ShardWriter(path, store.scratch_dir())
        writer.write({"__key__": "k", "jpg": b"z" * 5000})
        temps[path] = writer.tmp_path
        uploader.submit(writer)
    uploader.wait()
    part = layout.manifest_part("siim", "b0")
    manifest.write_part(store, part, manifest.to_table([]))
    commit = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith(part))

    def between(event, after, before):
        return any(e == event for e in events[after + 1 : before])

    for path in shard_paths:
        target = f"{root}/{path}"
        renamed = events.index(("replace", temps[path], target))
        assert between(("fsync", temps[path]), -1, renamed)  # the data, before the rename
        assert between(("fsync", os.path.dirname(target)), renamed, commit)  # the rename
        folder = os.path.dirname(path)
        while folder:  # every folder created on the way: its entry in its parent
            parent = f"{root}/{os.path.dirname(folder)}".rstrip("/")
            assert between(("fsync", parent), -1, commit), parent
            folder = os.path.dirname(folder)
    assert between(("fsync", f"{root}/{os.path.dirname(part)}"), commit, len(events))


def test_stores_share_a_session_until_the_credentials_change(s3_bucket, monkeypatch):
    import pneumo.shards.s3

    def access_key(store):
        return store.client._request_signer._credentials.get_frozen_credentials().access_key

    first, second = open_store(f"{s3_bucket}/a"), open_store(f"{s3_bucket}/b")
    sessions = dict(pneumo.shards.s3._sessions)
    assert first.client is not second.client
    assert access_key(first) == access_key(second) == os.environ["AWS_ACCESS_KEY_ID"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")
    third = pneumo.shards.s3.S3Store(s3_bucket.removeprefix("s3://"), "c")
    assert access_key(third) == "another-key"  # a new session, not the cached one
    assert len(pneumo.shards.s3._sessions) == len(sessions) + 1
    open_store(f"{s3_bucket}/d")
    assert len(pneumo.shards.s3._sessions) == len(sessions) + 1  # shared again
