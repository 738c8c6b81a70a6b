"""A fault-injecting HTTP proxy for S3 tests: put it between a client and moto's server.

    with FaultProxy(s3_endpoint, seed=1) as proxy:
        proxy.add("503", rate=0.3)                       # 30% of all requests: SlowDown
        proxy.add("reset", kinds={"put"}, nth=2)         # the 2nd PUT: connection reset
        proxy.add("expired", kinds={"get"}, after=5)     # every GET after the 5th: 403
        ... point AWS_ENDPOINT_URL (or a config file) at proxy.url ...

Faults (``action``):
    ``503``          503 SlowDown with S3's XML error body; the request never reaches the server
    ``500``          500 InternalError, likewise
    ``reset``        the connection is reset before the request is forwarded
    ``reset_after``  forwarded (the server acts on it), then reset: the response is lost
    ``cut``          forwarded, then the status, headers and half the body sent, then reset
    ``delay``        forwarded after ``delay_s`` seconds
    ``expired``      403 ExpiredToken (the request is signed with an expired token)
    ``bad_key``      403 InvalidAccessKeyId

A fault fires on a request that matches its ``kinds`` (see ``request_kind``), ``key_contains``
(a substring of the object key) and ``access_key`` (the key id in the SigV4 signature), and
then: on the ``nth`` matching request only, on every matching request ``after`` the first N,
with probability ``rate`` (seeded), at most ``times`` times. The first fault that fires
decides; the others still count the request as seen. Standard library only; each
connection is served by a thread.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

KINDS = frozenset(
    {"get", "range_get", "put", "put_if_absent", "list", "head", "delete", "multipart", "other"}
)
ACTIONS = frozenset({"503", "500", "reset", "reset_after", "cut", "delay", "expired", "bad_key"})

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "expired": (403, "ExpiredToken", "The provided token has expired."),
    "bad_key": (
        403,
        "InvalidAccessKeyId",
        "The AWS Access Key Id you provided does not exist in our records.",
    ),
}
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


@dataclass
class Fault:
    action: str
    kinds: frozenset[str] | None = None  # None: every kind
    rate: float = 1.0
    nth: int | None = None
    after: int | None = None
    key_contains: str | None = None
    access_key: str | None = None
    delay_s: float = 0.5
    times: int | None = None  # fire at most this many times
    seen: int = 0  # matching requests so far
    fired: int = 0

    def matches(self, kind: str, key: str, access_key: str | None) -> bool:
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.key_contains is not None and self.key_contains not in key:
            return False
        return self.access_key is None or self.access_key == access_key


@dataclass
class _Request:
    method: str
    path: str
    headers: Any
    body: bytes
    kind: str = "other"
    key: str = ""
    access_key: str | None = None


def request_kind(method: str, path: str, headers: Any) -> tuple[str, str]:
    """(kind, object key) of a path-style S3 request: ``/bucket/key?query``."""
    split = urlsplit(path)
    query = parse_qs(split.query, keep_blank_values=True)
    _, _, key = split.path.lstrip("/").partition("/")
    if "uploads" in query or "uploadId" in query:
        return "multipart", key
    if method == "GET":
        if not key:
            return "list", key
        return ("range_get" if headers.get("Range") else "get"), key
    if method == "HEAD":
        return ("head" if key else "other"), key
    if method == "PUT" and key:
        return ("put_if_absent" if headers.get("If-None-Match") else "put"), key
    if method == "DELETE" or (method == "POST" and "delete" in query):
        return "delete", key
    return "other", key


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []
        self.counts: Counter[tuple[str, str]] = Counter()  # (kind, action or "ok")
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- set-up -------------------------------------------------------------------------

    def add(
        self,
        action: str,
        *,
        kinds: Iterable[str] | None = None,
        rate: float = 1.0,
        nth: int | None = None,
        after: int | None = None,
        key_contains: str | None = None,
        access_key: str | None = None,
        delay_s: float = 0.5,
        times: int | None = None,
    ) -> Fault:
        if action not in ACTIONS:
            raise ValueError(f"unknown fault {action!r}; one of {sorted(ACTIONS)}")
        wanted = None if kinds is None else frozenset(kinds)
        if wanted is not None and not wanted <= KINDS:
            raise ValueError(f"unknown request kinds {sorted(wanted - KINDS)}")
        fault = Fault(action, wanted, rate, nth, after, key_contains, access_key, delay_s, times)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """No more faults (counts are kept)."""
        with self.lock:
            self.faults.clear()

    def count(self, kind: str | None = None, outcome: str | None = None) -> int:
        """Requests seen, of a kind and/or an outcome (an action, or "ok")."""
        with self.lock:
            return sum(
                n
                for (k, o), n in self.counts.items()
                if (kind is None or k == kind) and (outcome is None or o == outcome)
            )

    @property
    def url(self) -> str:
        if self.server is None:
            raise RuntimeError("the proxy is not started")
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        server.daemon_threads = True
        server.request_queue_size = 128  # clients open many connections at once
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- per request --------------------------------------------------------------------

    def _decide(self, req: _Request) -> Fault | None:
        chosen = None
        with self.lock:
            for fault in self.faults:
                if not fault.matches(req.kind, req.key, req.access_key):
                    continue
                fault.seen += 1
                if chosen is not None:
                    continue
                if fault.nth is not None and fault.seen != fault.nth:
                    continue
                if fault.after is not None and fault.seen <= fault.after:
                    continue
                if fault.times is not None and fault.fired >= fault.times:
                    continue
                if fault.rate < 1.0 and self.rng.random() >= fault.rate:
                    continue
                fault.fired += 1
                chosen = fault
            self.counts[(req.kind, chosen.action if chosen else "ok")] += 1
        return chosen


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    owner: FaultProxy
    _local = threading.local()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _handle(self) -> None:
        req = _Request(self.command, self.path, self.headers, self._read_body())
        req.kind, req.key = request_kind(req.method, req.path, req.headers)
        found = _CREDENTIAL.search(self.headers.get("Authorization", ""))
        req.access_key = found.group(1) if found else None
        fault = self.owner._decide(req)
        action = fault.action if fault else None
        if action in _ERRORS:
            self._send_error(*_ERRORS[action])
        elif action == "reset":
            self._reset()
        elif action == "delay":
            time.sleep(fault.delay_s if fault else 0)
            self._relay(*self._forward(req))
        elif action == "reset_after":
            self._forward(req)
            self._reset()
        elif action == "cut":
            self._relay(*self._forward(req), cut=True)
        else:
            self._relay(*self._forward(req))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _upstream(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection(*self.owner.upstream, timeout=120)
            self._local.conn = conn
        return conn

    def _forward(self, req: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP_BY_HOP}
        if req.body or req.method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(req.body))
        for attempt in (0, 1):  # a kept-alive upstream connection may have been closed
            conn = self._upstream(fresh=attempt == 1)
            try:
                conn.request(req.method, req.path, body=req.body or None, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                return resp.status, resp.getheaders(), body
            except (http.client.HTTPException, OSError):
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def _relay(
        self, status: int, headers: list[tuple[str, str]], body: bytes, *, cut: bool = False
    ) -> None:
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() in _HOP_BY_HOP or name.lower() == "content-length":
                continue
            self.send_header(name, value)
        if self.command == "HEAD":  # the object's length, with no body
            length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
            self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut and len(body) > 1:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.wfile.write(body)

    def _send_error(self, status: int, code: str, message: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{request_id}</RequestId><HostId>fault-proxy</HostId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        if self.command == "HEAD":  # no body: clients read the status alone
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks to a client."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.connection.close()
