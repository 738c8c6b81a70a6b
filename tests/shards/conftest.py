"""Fixtures of the shard tests that talk to S3."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from faults import FaultProxy


@pytest.fixture
def proxy(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault proxy (tests/faults.py) in front of the S3 server; pneumo's stores go
    through it."""
    if not s3_endpoint.startswith("http://"):
        pytest.skip("the fault proxy speaks plain HTTP")
    with FaultProxy(s3_endpoint, seed=17) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p
