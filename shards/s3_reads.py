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
# Lean GETs refused in a row (4xx) that the client then made: a server that takes only
# the client's requests; the store stops trying lean ones rather than send every GET
# twice. Throttling (5xx) and failures to send are the network's, and do not count.
LEAN_REFUSALS = 3


class LeanGet:
    """GETs of one store's objects, signed and sent without the client's per-call work.

    ``get`` answers ``(body, etag)`` or None where the client must make the request
    (no usable connection pool, an answer other than 200/206, a failure to send;
    ``rejected`` says whether the answer was a 4xx). After :data:`LEAN_REFUSALS` 4xx in a
    row of requests the client then made, it answers None at once (``enabled`` False), and
    says so once.
    """

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self.enabled = True
        self.rejected = False  # the last lean GET was answered 4xx
        self._urls: dict[str, str] = {}
        self._refusals = 0

    def refused(self) -> None:
        """The client's GET succeeded where the lean one had just been answered 4xx."""
        self._refusals += 1
        if self.enabled and self._refusals >= LEAN_REFUSALS:
            self.enabled = False
            log.info(
                "%s answers only the client's GETs; reads go through it from now on",
                self.store.endpoint_url or "S3",
            )

    def get(self, key: str, headers: dict[str, str]) -> tuple[Any, str | None] | None:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.exceptions import BotoCoreError

        self.rejected = False
        if not self.enabled:
            return None
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
        region = client.meta.region_name or "us-east-1"  # botocore's own default for S3
        S3SigV4Auth(credentials.get_frozen_credentials(), "s3", region).add_auth(request)
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
            self.rejected = 400 <= response.status_code < 500
            _discard(response.raw)
            return None
        self._refusals = 0
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
    if store.lean.rejected:
        store.lean.refused()
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
