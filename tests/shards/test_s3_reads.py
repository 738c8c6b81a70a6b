"""S3 GETs sent lean (pneumo.shards.s3_reads): the same bytes as the client's, the client's
errors and retries for anything but a good answer, the ETag pin on a resumed read."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from pneumo.shards.errors import StoreError
from pneumo.shards.s3 import S3Store
from pneumo.shards.store import open_store

pytestmark = pytest.mark.integration

DATA = random.Random(5).randbytes(300_000)


def _text(headers: Any) -> dict[str, str]:
    """A request's headers as text (botocore keeps some as bytes)."""
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in headers.items()}


def _store(bucket: str) -> S3Store:
    store = open_store(f"{bucket}/r")
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def sent(s3_bucket: str) -> Iterator[tuple[S3Store, list[dict[str, Any]], list[dict]]]:
    """A store holding ``obj.bin`` (DATA); the headers of every GET sent (either path), and
    the calls of the client's ``get_object``."""
    store = _store(s3_bucket)
    store.put("obj.bin", DATA)
    headers: list[dict[str, Any]] = []
    store.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: headers.append(_text(request.headers))
    )
    calls: list[dict] = []
    real = store.client.get_object
    store.client.get_object = lambda **kw: calls.append(kw) or real(**kw)  # type: ignore[method-assign]
    yield store, headers, calls


def test_ranges_are_read_lean_and_equal_the_object(sent):
    store, headers, calls = sent
    rng = random.Random(0)
    ranges = [(0, 1), (len(DATA) - 1, len(DATA)), (0, len(DATA))]
    ranges += [tuple(sorted(rng.sample(range(len(DATA) + 1), 2))) for _ in range(25)]
    for start, end in ranges:
        with store.open_range("obj.bin", start, end) as f:
            assert f.read() == DATA[start:end], (start, end)
    assert store.get("obj.bin") == DATA
    assert calls == []  # not one through the client's machinery
    assert [h["Range"] for h in headers[:-1]] == [
        f"bytes={s}-{e - 1}" for s, e in ranges
    ]  # exactly the asked-for bytes, one GET each
    assert all(h["Authorization"].startswith("AWS4-HMAC-SHA256 ") for h in headers)


def test_a_session_token_is_sent_with_the_lean_get(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-123")
    store = _store(s3_bucket)
    store.put("t.bin", b"abc")
    seen: list[dict[str, Any]] = []
    store.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: seen.append(_text(request.headers))
    )
    assert store.get("t.bin") == b"abc"
    assert seen[-1]["X-Amz-Security-Token"] == "token-123"


def test_a_missing_object_is_the_clients_one_line_error(sent):
    store, _, calls = sent
    with pytest.raises(StoreError) as err:
        store.open_range("none.bin", 0, 10)
    assert "\n" not in str(err.value) and f"{store.url}/none.bin" in str(err.value)
    assert len(calls) == 1  # the lean answer (404) dropped, the client asked again


def test_throttled_and_reset_lean_gets_are_retried_by_the_client(proxy, s3_bucket):
    store = _store(s3_bucket)
    store.put("obj.bin", DATA)
    proxy.add("503", kinds={"range_get"}, nth=1)
    proxy.add("reset", kinds={"range_get"}, nth=3)
    proxy.add("500", kinds={"range_get"}, rate=0.3)
    for start in range(0, 200_000, 20_000):
        with store.open_range("obj.bin", start, start + 30_000) as f:
            assert f.read() == DATA[start : start + 30_000]
    assert proxy.count("range_get", "503") == 1 and proxy.count("range_get", "reset") == 1
    assert proxy.count("range_get", "500") >= 2
    assert store.lean.enabled  # throttling is the network's: lean GETs go on


def test_a_read_resumed_after_its_object_was_replaced_is_an_error(proxy, s3_bucket):
    """The connection drops half-way; meanwhile the object is rewritten: the resumed GET
    is pinned to the first answer's ETag, so the read fails instead of splicing two
    versions together."""
    store = _store(s3_bucket)
    store.put("obj.bin", DATA)
    proxy.add("cut", kinds={"range_get"}, nth=1)
    reader = store.open_range("obj.bin", 1_000, 201_000)
    assert reader.read(50_000) == DATA[1_000:51_000]  # the cut comes at 100,000
    store.put("obj.bin", os.urandom(len(DATA)))
    with pytest.raises(StoreError) as err:
        while reader.read(50_000):
            pass
    assert "PreconditionFailed" in str(err.value) or "412" in str(err.value)
    # Not replaced: the same cut is resumed from the byte reached, the bytes all the first.
    store.put("same.bin", DATA)
    proxy.add("cut", kinds={"range_get"}, nth=1)
    with store.open_range("same.bin", 1_000, 201_000) as f:
        assert b"".join(iter(lambda: f.read(50_000), b"")) == DATA[1_000:201_000]
    assert proxy.count("range_get", "cut") == 2


def test_a_server_that_refuses_lean_gets_is_read_through_the_client(sent, caplog):
    """Three lean GETs refused in a row, each then made by the client: the store stops
    sending GETs twice. A refusal the client shares (a missing object) does not count."""
    store, headers, calls = sent
    for _ in range(5):
        with pytest.raises(StoreError):
            store.get("none.bin")
    assert store.lean.enabled and len(calls) == 5
    real_url = store.lean._url
    store.lean._url = lambda key: real_url(key + ".elsewhere")  # type: ignore[method-assign]
    with caplog.at_level("INFO", logger="pneumo.shards.s3_reads"):
        for _ in range(4):
            assert store.get("obj.bin") == DATA
    assert not store.lean.enabled
    assert len(headers) == 2 * 5 + 2 * 3 + 1  # 2 GETs a read until the third refusal, then 1
    assert sum("answers only the client's GETs" in r.message for r in caplog.records) == 1


def test_throttled_lean_gets_do_not_turn_the_lean_path_off(sent):
    """Five lean GETs in a row answered 503 (before-send answers for the lean requests,
    which carry no SDK invocation id): each read is the client's, and lean GETs go on."""
    import io

    from botocore.awsrequest import AWSResponse

    store, _, calls = sent
    throttled: list[str] = []

    def slow_down(request: Any, **_: Any) -> AWSResponse | None:
        if "amz-sdk-invocation-id" in request.headers or len(throttled) == 5:
            return None
        throttled.append(request.url)
        return AWSResponse(request.url, 503, {}, io.BytesIO(b"<Error>SlowDown</Error>"))

    store.client.meta.events.register_first("before-send.s3.GetObject", slow_down)
    for start in range(0, 6000, 1000):
        with store.open_range("obj.bin", start, start + 500) as f:
            assert f.read() == DATA[start : start + 500]
    assert len(throttled) == 5 and len(calls) == 5  # the client made the throttled reads
    assert store.lean.enabled
