"""Reading S3 objects: streams that survive dropped connections, each GET sent lean.

Training reads shards as many small ranged GETs (a piece of two samples each, see
``pneumo.shards.slots``): hundreds a second on a node whose cores are busy decoding. A GET
made by botocore's client costs ~1.7 ms of CPU before the bytes (parameter validation,
endpoint rules, event hooks, response parsing); the same GET, signed with SigV4 by
botocore's own signer and sent on the client's own connection pool, ~0.85 ms (200 KB
ranges from the loopback server: ``python benchmarks/bench_s3_get.py``).

:func:`open_object` sends a GET that way when it can (:class:`LeanGet`): the URL is the
one the client itself would use (a presigned URL of the key, its query dropped, made once
per key), the signature uses the session's current credentials, and the request passes
the client's ``before-send`` hooks (moto's in-process mock and the benchmarks' latency
hook live there). An answer other than 200/206, or a request that could not be sent, is
dropped and the GET made again by the client's ``get_object``, through the store's
``call``: botocore's retries and backoff, its error codes, the store's credential renewal
and its one-line errors all stay where they were. So the lean path makes successful reads
cheaper and changes nothing else.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any

from pneumo.shards.errors import StoreError

if TYPE_CHECKING:
    from pneumo.shards.s3 import S3Store

log = logging.getLogger(__name__)

_URLS_KEPT = 4096  # object URLs remembered per store (one per shard read)


class LeanGet:
    """GETs of one store's objects, signed and sent without the client's per-call work.

    ``get`` answers ``(body, etag)`` or None where the client must make the request
    (no usable connection pool, an answer other than 200/206, a failure to send).
    """

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self._urls: dict[str, str] = {}

    def get(self, key: str, headers: dict[str, str]) -> tuple[Any, str | None] | None:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.exceptions import BotoCoreError

        client = self.store.client
        # botocore keeps the client's connection pool (its TLS, proxy and timeout
        # settings) here; without it the client makes every request.
        http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        if http is None:
            return None
        request = AWSRequest(
            method="GET", url=self._url(key), headers=dict(headers), stream_output=True
        )
        credentials = self.store.session.get_credentials()
        if credentials is None:
            return None
        S3SigV4Auth(credentials.get_frozen_credentials(), "s3", client.meta.region_name).add_auth(
            request
        )
        prepared = request.prepare()
        try:
            hooked = client.meta.events.emit_until_response(
                "before-send.s3.GetObject", request=prepared
            )[1]
            response = hooked if hooked is not None else http.send(prepared)
        except (BotoCoreError, OSError) as e:
            log.debug("s3://%s/%s: lean GET not sent (%s)", self.store.bucket, key, e)
            return None
        if response.status_code not in (200, 206):
            _discard(response.raw)
            return None
        return response.raw, response.headers.get("ETag")

    def _url(self, key: str) -> str:
        url = self._urls.get(key)
        if url is None:
            presigned = self.store.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.store.bucket, "Key": key}, ExpiresIn=60
            )
            if len(self._urls) >= _URLS_KEPT:
                self._urls.clear()
            url = self._urls[key] = presigned.split("?", 1)[0]
        return url


def _discard(raw: Any) -> None:
    """Let go of an error answer's body (a few hundred bytes of XML)."""
    try:
        raw.read()
    except Exception:  # noqa: BLE001 - the client repeats the request and reports
        pass
    finally:
        close = getattr(raw, "close", None)
        if close is not None:
            close()


def open_object(store: S3Store, key: str, headers: dict[str, str]) -> tuple[Any, str | None]:
    """The body of a GET of ``key`` with ``headers`` (Range, If-Match) and the ETag,
    sent lean where it can be and by the client otherwise.

    Raises:
        StoreError: the client's answer after its retries (no such object, refused
            credentials, the object replaced since the ETag was read...).
    """
    answer = store.lean.get(key, headers)
    if answer is not None:
        return answer
    kwargs: dict[str, Any] = {"Bucket": store.bucket, "Key": key}
    if "Range" in headers:
        kwargs["Range"] = headers["Range"]
    if "If-Match" in headers:
        kwargs["IfMatch"] = headers["If-Match"]
    url = f"s3://{store.bucket}/{key}"
    response = store.call(f"cannot read {url}", lambda c: c.get_object(**kwargs))
    return response["Body"], response.get("ETag")


class ResumingReader(io.RawIOBase):
    """An S3 object (or bytes ``[start, end)`` of it) read front to back; a connection
    dropped mid-way is picked up again with a ranged GET from the last byte received
    (pinned to the object's ETag, so a replaced object is an error, never a splice of two
    versions)."""

    RETRIES = 5

    def __init__(self, store: S3Store, key: str, start: int = 0, end: int | None = None) -> None:
        super().__init__()
        self.store, self.key, self.pos = store, key, 0
        self.start, self.end = start, end
        self.etag: str | None = None
        self.body = self._open()

    def _open(self) -> Any:
        headers: dict[str, str] = {}
        first = self.start + self.pos
        if self.end is not None:
            headers["Range"] = f"bytes={first}-{self.end - 1}"
        elif first:
            headers["Range"] = f"bytes={first}-"
        if self.pos and self.etag:
            headers["If-Match"] = self.etag
        body, etag = open_object(self.store, self.key, headers)
        self.etag = self.etag or etag
        return body

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        for attempt in range(self.RETRIES + 1):
            try:
                data = self.body.read() if size is None or size < 0 else self.body.read(size)
                self.pos += len(data)
                return data
            except (BotoCoreError, HTTPError, ConnectionError) as e:
                if attempt == self.RETRIES:
                    raise StoreError(
                        f"lost s3://{self.store.bucket}/{self.key} at byte "
                        f"{self.pos} after {self.RETRIES} retries: {e}"
                    ) from e
                log.warning(
                    "s3://%s/%s: connection lost at byte %d (%s); resuming",
                    self.store.bucket,
                    self.key,
                    self.pos,
                    type(e).__name__,
                )
                time.sleep(min(2.0, 0.1 * 2**attempt))
                self.body = self._open()
        raise AssertionError("unreachable")

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()
