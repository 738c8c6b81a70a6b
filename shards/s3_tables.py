"""deltalake's and pyarrow's views of an S3 store: its endpoint, credentials and retries.

Both get the endpoint boto3 resolved (``AWS_ENDPOINT_URL`` or the AWS config file's
``endpoint_url``; neither library reads the config file's), path-style off AWS, and boto3's
credentials as they are now: botocore refreshes temporary ones 10-15 minutes before they
expire, and neither library takes a credentials callback, so make the options or the
filesystem for each use and never keep them.

deltalake (delta-rs's object_store) retries throttling, 5xx answers and dropped connections
itself, with exponential backoff (its own defaults are 10 retries within 3 minutes; the
option names are those of delta-rs's "Advanced object storage configuration"). It does not
retry a commit (a conditional PUT) whose connection dropped: that commit may have landed.

pyarrow's S3 filesystem (the AWS SDK for C++) loses reads under throttling: through
tests/faults.py at 20% SlowDown, 24 of 40 reads of a 10-part Parquet dataset failed with its
default retry strategy and 2 of 20 with ``AwsStandardS3RetryStrategy(max_attempts=10)``
("SERVICE_UNAVAILABLE during GetObject"), though one GET answered 503 five times in a row
is retried; and a small ranged read whose error body outgrows the read's buffer fails as
INTERNAL_FAILURE ("Failed to flush response stream"), which the SDK never retries. So reads
of objects in the store's bucket are ranged GETs of the store (0 of 120 such reads failed,
40 of them with 5% connection resets too): botocore's retries with backoff, a dropped body resumed,
refused credentials asked again, failures as one StoreError line. Listing,
HEAD and writes, which the SDK does retry, stay with pyarrow's filesystem.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pyarrow as pa
from pyarrow import fs

if TYPE_CHECKING:
    from pneumo.shards.s3 import S3Store


def delta_options(store: S3Store) -> dict[str, str]:
    """``storage_options`` for ``deltalake`` (see the module docstring)."""
    from pneumo.shards.s3 import RETRY_ATTEMPTS, RETRY_TIMEOUT_S, _frozen

    options: dict[str, str] = {
        "AWS_S3_ALLOW_UNSAFE_RENAME": "false",
        "max_retries": str(RETRY_ATTEMPTS),
        "retry_timeout": f"{RETRY_TIMEOUT_S}s",
        "backoff_config.init_backoff": "100ms",
        "backoff_config.max_backoff": "20s",
        "backoff_config.base": "2",
    }
    frozen = _frozen(store.session)
    if frozen is not None:
        options["AWS_ACCESS_KEY_ID"] = frozen.access_key
        options["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
        if frozen.token:
            options["AWS_SESSION_TOKEN"] = frozen.token
    endpoint = store.endpoint_url
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        options["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "false"
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    options["AWS_REGION"] = store.client.meta.region_name or "us-east-1"
    return options


def arrow_filesystem(store: S3Store) -> fs.PyFileSystem:
    """pyarrow's ``S3FileSystem`` (the AWS SDK's standard retries, the endpoint passed:
    it reads neither ``AWS_ENDPOINT_URL`` nor the config file), its reads of the store's
    bucket made through the store (see the module docstring)."""
    from pneumo.shards.s3 import RETRY_ATTEMPTS, _frozen

    kwargs: dict[str, Any] = {
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=RETRY_ATTEMPTS),
    }
    frozen = _frozen(store.session)
    if frozen is not None:
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
        if frozen.token:
            kwargs["session_token"] = frozen.token
    endpoint = store.endpoint_url
    if endpoint:  # path-style: pyarrow's default with an endpoint override
        parts = urlsplit(endpoint)
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        kwargs["scheme"] = parts.scheme or "https"
    region = store.client.meta.region_name
    if region:
        kwargs["region"] = region
    return fs.PyFileSystem(StoreReadsHandler(store, fs.S3FileSystem(**kwargs)))


class _ObjectFile:
    """A seekable, read-only file object over one S3 object (for ``pa.PythonFile``)."""

    def __init__(self, store: S3Store, key: str, size: int) -> None:
        self.store, self.key, self.size, self.pos = store, key, size, 0
        self.closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        from pneumo.shards.s3_reads import ResumingReader

        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        with ResumingReader(self.store, self.key, self.pos, end) as reader:
            data = reader.read()
        self.pos += len(data)
        return data

    def close(self) -> None:
        self.closed = True


class StoreReadsHandler(fs.FileSystemHandler):
    """``native`` (a ``pyarrow.fs.S3FileSystem``) with its reads in ``store``'s bucket
    made through ``store`` (see the module docstring)."""

    def __init__(self, store: S3Store, native: fs.S3FileSystem) -> None:
        self.store, self.native = store, native

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoreReadsHandler) and other.store is self.store

    def __hash__(self) -> int:
        return id(self.store)

    def get_type_name(self) -> str:
        return "pneumo-s3"

    def normalize_path(self, path: str) -> str:
        return str(self.native.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[fs.FileInfo]:
        return list(self.native.get_file_info(paths))

    def get_file_info_selector(self, selector: fs.FileSelector) -> list[fs.FileInfo]:
        return list(self.native.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self.native.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.native.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.native.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.native.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.native.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.native.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.native.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self.open_input_file(path)

    def open_input_file(self, path: str) -> Any:
        bucket, _, key = path.lstrip("/").partition("/")
        if bucket != self.store.bucket or not key:
            return self.native.open_input_file(path)
        size = _size(self.store, key)
        if size is None:
            raise FileNotFoundError(f"s3://{bucket}/{key} does not exist")
        return pa.PythonFile(_ObjectFile(self.store, key, size), mode="r")

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        return self.native.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self.native.open_append_stream(path, metadata=metadata)


def _size(store: S3Store, key: str) -> int | None:
    """The object's size (a HEAD, retried like every request of the store); None if none."""
    from botocore.exceptions import ClientError

    def head(client: Any) -> int | None:
        try:
            return int(client.head_object(Bucket=store.bucket, Key=key)["ContentLength"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    return store.call(f"cannot read s3://{store.bucket}/{key}", head)
