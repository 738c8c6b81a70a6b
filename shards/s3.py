"""S3 (or MinIO, or any S3-compatible server) behind the store interface of ``pneumo.shards.store``.

Configured only the standard way, through the ``AWS_*`` variables and files that boto3
reads. Reads survive dropped connections (a ranged GET from the last byte received) and
can be ranged themselves; uploads over 64 MiB are multipart.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pneumo.shards.errors import StoreError
from pneumo.shards.store import clean_path

log = logging.getLogger(__name__)

# Multipart above 64 MiB, in 64 MiB parts: a 1 GiB shard is 16 parts uploaded concurrently.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024


# Where boto3 finds credentials: a change of any of them needs a new session.
_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class S3Settings:
    """S3 settings, read once at the edge from the standard variables boto3 reads.

    ``credentials_id`` is a hash of the credential variables (never the values), so a
    boto3 session is shared only while they stay the same.
    """

    endpoint_url: str | None
    region: str | None
    credentials_id: str = ""

    @classmethod
    def from_env(cls) -> S3Settings:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        creds = "\0".join(os.environ.get(name, "") for name in _CREDENTIAL_VARS)
        return cls(
            endpoint_url=endpoint or None,
            region=region or None,
            credentials_id=hashlib.sha256(creds.encode()).hexdigest(),
        )


# One boto3 session per credentials, shared by the clients of a process: a new session
# parses botocore's service models again (0.2-0.4 s), and loader workers forked from a
# process that opened the store inherit a warm one (a client in 0.03-0.08 s).
_sessions: dict[str, Any] = {}
_sessions_lock = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().update(_sessions_lock=threading.Lock()))


def _s3_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 8, "mode": "adaptive"},
        max_pool_connections=32,
        s3={"addressing_style": "path"} if settings.endpoint_url else {},
    )
    # Sessions are not thread-safe: clients are made one at a time. boto3 itself reads
    # AWS_ENDPOINT_URL / credentials / profiles; passing the endpoint explicitly only
    # matters for older botocore releases.
    with _sessions_lock:
        session = _sessions.get(settings.credentials_id)
        if session is None:
            session = _sessions[settings.credentials_id] = boto3.session.Session()
        return session.client(
            "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
        )


class _ResumingReader(io.RawIOBase):
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
        from botocore.exceptions import ClientError

        kwargs: dict[str, Any] = {"Bucket": self.store.bucket, "Key": self.key}
        first = self.start + self.pos
        if self.end is not None:
            kwargs["Range"] = f"bytes={first}-{self.end - 1}"
        elif first:
            kwargs["Range"] = f"bytes={first}-"
        if self.pos:
            kwargs["IfMatch"] = self.etag
        try:
            response = self.store.client.get_object(**kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            url = f"s3://{self.store.bucket}/{self.key}"
            raise StoreError(f"cannot read {url} (S3 error {code})") from e
        self.etag = self.etag or response.get("ETag")
        return response["Body"]

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


class S3Store:
    """``s3://bucket/prefix`` through boto3 (retries with backoff, multipart uploads)."""

    def __init__(self, bucket: str, prefix: str, settings: S3Settings | None = None) -> None:
        self.bucket = bucket
        self.prefix = clean_path(prefix)
        self.settings = settings or S3Settings.from_env()
        self.client = _s3_client(self.settings)
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"{url!r} names no bucket (expected s3://bucket/prefix)")
        store = cls(bucket, prefix)
        store.check_reachable()
        return store

    def check_reachable(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            raise StoreError(f"bucket {self.bucket!r} is not usable (S3 error {code})") from e
        except BotoCoreError as e:
            where = self.settings.endpoint_url or "AWS S3"
            raise StoreError(f"cannot reach the object store at {where}: {e}") from e

    def _k(self, path: str) -> str:
        path = clean_path(path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def url_of(self, path: str) -> str:
        return f"s3://{self.bucket}/{self._k(path)}"

    def local_path(self, path: str) -> Path | None:
        return None

    def get(self, path: str) -> bytes:
        return self.open_read(path).read()

    def open_read(self, path: str) -> IO[bytes]:
        """A stream of the object that survives dropped connections (see _ResumingReader)."""
        return _ResumingReader(self, self._k(path))  # type: ignore[return-value]

    def open_range(self, path: str, start: int, end: int) -> IO[bytes]:
        """Bytes ``[start, end)`` of the object: one ranged GET (resumed like ``open_read``)."""
        if end <= start:
            return io.BytesIO(b"")
        return _ResumingReader(self, self._k(path), start, end)  # type: ignore[return-value]

    def put(self, path: str, data: bytes) -> None:
        if len(data) > MULTIPART_THRESHOLD:
            self._upload(path, io.BytesIO(data))
        else:
            self.client.put_object(Bucket=self.bucket, Key=self._k(path), Body=data)

    def put_file(self, path: str, local_path: str | os.PathLike[str]) -> None:
        with open(local_path, "rb") as f:
            self._upload(path, f)

    def scratch_dir(self) -> Path | None:
        return None

    def move_file(self, path: str, local_path: str | os.PathLike[str]) -> None:
        self.put_file(path, local_path)
        Path(local_path).unlink(missing_ok=True)

    def _upload(self, path: str, fileobj: IO[bytes]) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=8,
        )
        self.client.upload_fileobj(fileobj, self.bucket, self._k(path), Config=config)

    def exists(self, path: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(path))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _list_prefix(self, prefix: str) -> str:
        if not prefix:
            return self.prefix + "/" if self.prefix else ""
        # "shards/x/b1/" must not match "shards/x/b10/...": keep the trailing slash.
        return self._k(prefix) + ("/" if prefix.endswith("/") else "")

    def list(self, prefix: str = "") -> list[str]:
        full = self._list_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        ):
            for obj in page.get("Contents", []):
                rel = obj["Key"][strip:]
                if not rel.rsplit("/", 1)[-1].startswith("."):
                    out.append(rel)
        return sorted(out)

    def delete(self, path: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(path))

    def clean_incomplete(self, prefix: str) -> int:
        """Abort the multipart uploads that killed writes left under ``prefix`` (their
        parts are stored, and billed, until aborted); returns how many."""
        aborted = 0
        for page in self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self._list_prefix(prefix)
        ):
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted += 1
        return aborted

    def arrow_filesystem(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` with the same endpoint and credentials.

        ``pyarrow.fs.S3FileSystem()`` does not read ``AWS_ENDPOINT_URL``: pass it here.
        """
        from pyarrow import fs

        creds = self.client._request_signer._credentials  # resolved by boto3's chain
        kwargs: dict[str, Any] = {}
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
            if frozen.token:
                kwargs["session_token"] = frozen.token
        if self.settings.endpoint_url:
            endpoint = self.settings.endpoint_url
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        region = self.client.meta.region_name
        if region:
            kwargs["region"] = region
        return fs.S3FileSystem(**kwargs)
