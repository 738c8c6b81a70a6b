"""S3 (or MinIO, or any S3-compatible server) behind the store interface of ``pneumo.shards.store``.

Configured only the standard way, through the ``AWS_*`` variables and files that boto3
reads (an endpoint set only in the AWS config file included). Every request is retried
with exponential backoff (``RETRY_ATTEMPTS``); reads survive dropped connections (a ranged
GET from the last byte received) and can be ranged themselves; reads announced by
``prefetch`` are opened ahead, a few at a time (``pneumo.shards.cache.ReadAhead``), so their
time to first byte passes while earlier ones are read, and each GET is sent lean
(``pneumo.shards.s3_reads``); uploads over 64 MiB are multipart.
Whatever still fails is one ``StoreError`` line naming the object, the store's answer and
what to do (renew refused credentials, say): never a botocore traceback. The views of
deltalake and pyarrow on the same store are in ``pneumo.shards.s3_tables``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

from pneumo.shards.cache import ReadAhead
from pneumo.shards.errors import StoreError
from pneumo.shards.s3_reads import LeanGet, ResumingReader
from pneumo.shards.store import clean_path

log = logging.getLogger(__name__)

T = TypeVar("T")

# Multipart above 64 MiB, in 64 MiB parts: a 1 GiB shard is 16 parts uploaded concurrently.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024


# Where boto3 finds credentials: a change of any of them needs a new session.
_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
)  # fmt: skip

# Every client retries a failed request up to this many times, with exponential backoff and
# jitter: boto3 (botocore's "standard" mode), pyarrow (the AWS SDK's standard strategy) and
# deltalake (object_store). Not botocore's "adaptive" mode: its client-side rate limiter
# collapses under sustained SlowDown answers (through tests/faults.py, 80 requests at 30%
# faults took 55 s adaptive, 15 s standard, with 12-second stalls).
RETRY_ATTEMPTS = 10
RETRY_TIMEOUT_S = 300  # deltalake/object_store: no retry starts later than this after the first
# S3 error codes of refused credentials: the store asks boto3 for its credentials again and,
# if they changed (a credentials file rewritten by a token refresher), retries once with them.
_CREDENTIAL_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "InvalidToken",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
    }
)


# The answers to a conditional PUT whose object exists (or is being created by another).
_TAKEN = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "409", "412"})


@dataclass(frozen=True, kw_only=True)
class S3Settings:
    """S3 settings, read once at the edge from the standard variables boto3 reads.

    ``endpoint_url`` is the one the variables name (``AWS_ENDPOINT_URL_S3``,
    ``AWS_ENDPOINT_URL``); without them boto3 resolves it from the AWS config file
    (``endpoint_url`` in the profile or in its ``services`` section) and the store uses that
    one everywhere (``S3Store.endpoint_url``). ``credentials_id`` is a hash of the credential
    variables (never the values), so a boto3 session is shared only while they stay the same.
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


def _session(credentials_id: str) -> Any:
    import boto3

    with _sessions_lock:
        session = _sessions.get(credentials_id)
        if session is None:
            session = _sessions[credentials_id] = boto3.session.Session()
        return session


def _is_aws(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "amazonaws.com" or host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _s3_client(session: Any, settings: S3Settings) -> Any:
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": RETRY_ATTEMPTS, "mode": "standard"},
        max_pool_connections=32,
        # MinIO has no bucket DNS. An endpoint from the AWS config file gets path-style
        # too: botocore's "auto" addressing is virtual-hosted on AWS's endpoints only.
        s3={"addressing_style": "path"} if settings.endpoint_url else {},
    )
    # Sessions are not thread-safe: clients are made one at a time. boto3 itself resolves
    # the endpoint from the variables or the config file; passing it explicitly only
    # matters for older botocore releases.
    with _sessions_lock:
        return session.client(
            "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
        )


def _frozen(session: Any) -> Any:
    """The session's current credentials (refreshed first if they are about to expire)."""
    creds = session.get_credentials()
    return None if creds is None else creds.get_frozen_credentials()


def _code(e: Any) -> str:
    """The S3 error code of a ClientError ("404" when a HEAD answer had no body)."""
    error = e.response.get("Error", {})
    return str(error.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _store_error(e: Exception, what: str, endpoint: str) -> StoreError:
    """One line saying what failed, the store's answer, and what to do about it."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if not isinstance(e, ClientError):
        reason = " ".join(str(e).split())
        if isinstance(e, (HTTPClientError, BotoConnectionError)):
            return StoreError(f"{what}: cannot reach the object store at {endpoint} ({reason})")
        return StoreError(f"{what}: {reason}")
    code = _code(e)
    message = " ".join(str(e.response.get("Error", {}).get("Message") or "").split())
    message = message.rstrip(".")
    detail = f"S3 error {code}" + (f": {message}" if message and message != code else "")
    hint = ""
    if code in _CREDENTIAL_CODES:
        hint = "; renew the credentials (AWS_* variables, profile or credentials file)"
    elif code in ("403", "AccessDenied"):
        hint = "; check the credentials and the bucket's policy"
    return StoreError(f"{what} ({detail}){hint}")


class S3Store:
    """``s3://bucket/prefix`` through boto3 (retries with backoff, multipart uploads)."""

    def __init__(self, bucket: str, prefix: str, settings: S3Settings | None = None) -> None:
        self.bucket = bucket
        self.prefix = clean_path(prefix)
        self.settings = settings or S3Settings.from_env()
        self.session = _session(self.settings.credentials_id)
        self.client = _s3_client(self.session, self.settings)
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._ahead = ReadAhead()  # GETs opened ahead: keyed (key, start, end or None)
        self.lean = LeanGet(self)  # GETs sent without the client's per-call work

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"{url!r} names no bucket (expected s3://bucket/prefix)")
        store = cls(bucket, prefix)
        store.check_reachable()
        return store

    @property
    def endpoint_url(self) -> str | None:
        """The endpoint of a MinIO or other S3-compatible server (from the variables or the
        AWS config file, as boto3 resolved it); None for AWS S3 itself."""
        resolved = self.client.meta.endpoint_url
        return None if self.settings.endpoint_url is None and _is_aws(resolved) else resolved

    def call(self, what: str, request: Callable[[Any], T]) -> T:
        """``request(client)``, its failures turned into one StoreError line beginning with
        ``what``. botocore has already retried it (``RETRY_ATTEMPTS``); refused credentials
        are asked of boto3 again, and the request retried once if they changed."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        renewed = False
        while True:
            try:
                return request(self.client)
            except ClientError as e:
                if not renewed and _code(e) in _CREDENTIAL_CODES and self._renew_credentials():
                    renewed = True
                    continue
                raise _store_error(e, what, self.endpoint_url or "AWS S3") from e
            except (BotoCoreError, Boto3Error) as e:
                raise _store_error(e, what, self.endpoint_url or "AWS S3") from e

    def _renew_credentials(self) -> bool:
        """Ask boto3's chain for credentials again; True if it found other ones (then this
        store and the stores opened after it use them). Temporary credentials that botocore
        refreshes itself never come here; static ones do when their file was rewritten."""
        import boto3

        fresh = boto3.session.Session()
        if _frozen(fresh) == _frozen(self.session):
            return False
        log.warning("%s: the store refused the credentials; using renewed ones", self.url)
        with _sessions_lock:
            _sessions[self.settings.credentials_id] = fresh
        self.session = fresh
        self.client = _s3_client(fresh, self.settings)
        return True

    def check_reachable(self) -> None:
        what = f"bucket {self.bucket!r} is not usable"
        self.call(what, lambda c: c.head_bucket(Bucket=self.bucket))

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
        """A stream of the object that survives dropped connections (see ResumingReader)."""
        return self._reader(self._k(path), 0, None)  # type: ignore[return-value]

    def open_range(self, path: str, start: int, end: int) -> IO[bytes]:
        """Bytes ``[start, end)`` of the object: one ranged GET (resumed like ``open_read``)."""
        if end <= start:
            return io.BytesIO(b"")
        return self._reader(self._k(path), start, end)  # type: ignore[return-value]

    def prefetch(self, path: str, ranges: Sequence[tuple[int, int]] | None) -> None:
        """Open the GETs that ``open_range`` of ``ranges`` (None: ``open_read``) of ``path``
        will make, in a few threads: the answer's headers come now, its bytes stream when
        read (a held answer costs a connection, not memory). Their errors are raised by
        the ``open_range`` (``open_read``) that takes them."""
        key = self._k(path)
        for start, end in [(0, None)] if ranges is None else ranges:
            if end is None or start < end:
                self._ahead.start((key, start, end), partial(ResumingReader, self, key, start, end))

    def _reader(self, key: str, start: int, end: int | None) -> ResumingReader:
        """The GET of ``[start, end)`` of ``key``: the one ``prefetch`` opened, or a new one."""
        opened = self._ahead.take((key, start, end))
        if opened is not None:
            return opened.result()  # type: ignore[no-any-return]
        return ResumingReader(self, key, start, end)

    def size(self, path: str) -> int:
        """Bytes of the object (one HEAD request)."""
        key = self._k(path)
        head = self.call(
            f"cannot look for {self.url_of(path)}",
            lambda c: c.head_object(Bucket=self.bucket, Key=key),
        )
        return int(head["ContentLength"])

    def put(self, path: str, data: bytes) -> None:
        if len(data) > MULTIPART_THRESHOLD:
            self._upload(path, io.BytesIO(data))
        else:
            key = self._k(path)
            self.call(
                f"cannot write {self.url_of(path)}",
                lambda c: c.put_object(Bucket=self.bucket, Key=key, Body=data),
            )

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Create ``path`` unless it exists (``If-None-Match: *``, honoured by AWS S3 since
        2024-08, MinIO and Ceph RGW); True if this call created it. Exactly one of any
        number of writers racing for the same name wins.

        A PUT retried after its answer was lost (a dropped connection, a timeout) may find
        the object its first attempt created: then the stored bytes are compared with
        ``data``, and equal bytes count as created by this call (writers that must tell
        each other apart put distinct bytes: an owner id, a token).
        """
        from botocore.exceptions import ClientError

        key = self._k(path)

        def put(client: Any) -> bool:
            try:
                client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            except ClientError as e:
                if _code(e) not in _TAKEN:
                    raise
                if e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) == 0:
                    return False
                return bool(client.get_object(Bucket=self.bucket, Key=key)["Body"].read() == data)
            return True

        return self.call(f"cannot create {self.url_of(path)}", put)

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
        key, start = self._k(path), fileobj.tell()

        def upload(client: Any) -> None:
            fileobj.seek(start)  # from the start again if renewed credentials retry it
            client.upload_fileobj(fileobj, self.bucket, key, Config=config)

        self.call(f"cannot write {self.url_of(path)}", upload)

    def exists(self, path: str) -> bool:
        from botocore.exceptions import ClientError

        key = self._k(path)

        def head(client: Any) -> bool:
            try:
                client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as e:
                if _code(e) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            return True

        return self.call(f"cannot look for {self.url_of(path)}", head)

    def modified(self, path: str) -> float:
        """When ``path`` was last written (seconds since the epoch)."""
        key = self._k(path)
        head = self.call(
            f"cannot look for {self.url_of(path)}",
            lambda c: c.head_object(Bucket=self.bucket, Key=key),
        )
        return float(head["LastModified"].timestamp())

    def _list_prefix(self, prefix: str) -> str:
        if not prefix:
            return self.prefix + "/" if self.prefix else ""
        # "shards/x/b1/" must not match "shards/x/b10/...": keep the trailing slash.
        return self._k(prefix) + ("/" if prefix.endswith("/") else "")

    def list(self, prefix: str = "") -> list[str]:
        full = self._list_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def listing(client: Any) -> list[str]:
            out: list[str] = []
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][strip:]
                    if not rel.rsplit("/", 1)[-1].startswith("."):
                        out.append(rel)
            return sorted(out)

        return self.call(f"cannot list s3://{self.bucket}/{full}", listing)

    def delete(self, path: str) -> None:
        key = self._k(path)
        self.call(
            f"cannot delete {self.url_of(path)}",
            lambda c: c.delete_object(Bucket=self.bucket, Key=key),
        )

    def clean_incomplete(self, prefix: str) -> int:
        """Abort the multipart uploads that killed writes left under ``prefix`` (their
        parts are stored, and billed, until aborted); returns how many."""
        full = self._list_prefix(prefix)

        def abort(client: Any) -> int:
            aborted = 0
            pages = client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
            return aborted

        return self.call(f"cannot clean s3://{self.bucket}/{full}", abort)

    def table_uri(self, path: str) -> str:
        """The ``s3://`` URI of a Delta table stored at ``path``."""
        return self.url_of(path).rstrip("/")

    def delta_options(self) -> dict[str, str]:
        """``storage_options`` for ``deltalake``: this store's endpoint (the one boto3
        resolved, from the variables or the AWS config file), credentials as they are now,
        and retries. Make them for each table opened (``pneumo.shards.s3_tables``)."""
        from pneumo.shards.s3_tables import delta_options

        return delta_options(self)

    def arrow_filesystem(self) -> Any:
        """A pyarrow filesystem with this store's endpoint, credentials and retries, its
        reads made through this store. Make one per use (``pneumo.shards.s3_tables``)."""
        from pneumo.shards.s3_tables import arrow_filesystem

        return arrow_filesystem(self)
