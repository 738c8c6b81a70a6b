"""A loopback S3 server with a simulated round-trip time, for the benchmarks.

moto's server on 127.0.0.1 answers in microseconds; a real bucket takes tens of
milliseconds to the first byte. ``latency(seconds)`` makes every boto3 request sleep that
long first (a botocore ``before-send`` hook), in this process and in forked workers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3

_latency_s = [0.0]


@contextmanager
def s3_server(bucket: str) -> Iterator[str]:
    """Start moto on 127.0.0.1, point the AWS_* variables at it, create ``bucket``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        os.environ.pop(name, None)
    _install_hook()
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        server.stop()


def set_latency(seconds: float) -> None:
    """From now on every S3 request sleeps ``seconds`` first (0: no delay)."""
    _latency_s[0] = seconds


def _install_hook() -> None:
    original = boto3.session.Session.client
    if getattr(original, "_pneumo_latency", False):
        return

    def client(self: Any, *args: Any, **kwargs: Any) -> Any:
        made = original(self, *args, **kwargs)
        made.meta.events.register("before-send.s3", _sleep)
        return made

    client._pneumo_latency = True  # type: ignore[attr-defined]
    boto3.session.Session.client = client  # type: ignore[method-assign]


def _sleep(**_: Any) -> None:
    if _latency_s[0]:
        time.sleep(_latency_s[0])
