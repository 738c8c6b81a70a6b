"""Object storage behind one small interface: a local folder or an ``s3://bucket/prefix``.

A local folder (here) is the embedded default that needs nothing running. S3 (and MinIO,
or any S3-compatible server; ``pneumo.shards.s3``) is configured only the standard way, through
the ``AWS_*`` variables and files that boto3 reads (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), so pointing pneumo at MinIO is one environment variable.

Every path given to a store is relative to its root and uses ``/``. Writes are atomic: a
reader sees the old object or the whole new one, never a part (local: temp file + rename;
S3: a single PUT or a completed multipart upload). Local writes are also durable: the file
is fsynced before its rename, and its folder (and every folder created for it) after, so a
manifest part committed after its shards never names a shard lost in a power cut. Local
files get the mode the umask gives (0644 under the usual 022), as other tools write them.
Reads can be ranged (``open_range``): one GET with a ``Range`` header on S3. A reader that
knows what it will read next says so (``prefetch``): S3 then starts those GETs early, in a
few threads, so their latency overlaps the reading of the current one (a local folder has
no latency to hide and ignores it). ``pneumo.shards.cache`` keeps shards of a remote store on
local disk.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from pneumo.shards.errors import StoreError


class Store(Protocol):
    """What every store can do. ``url`` is the root it was opened on.

    ``prefetch(path, ranges)`` says that ``open_range`` (``ranges`` None: ``open_read``)
    of those byte ranges of ``path`` will come soon; a store may start them early and hand
    them over then. The error of a read started early is raised where that read is
    opened, as it would have been. ``size(path)`` is the object's size in bytes.
    """

    url: str

    def get(self, path: str) -> bytes: ...
    def open_read(self, path: str) -> IO[bytes]: ...
    def open_range(self, path: str, start: int, end: int) -> IO[bytes]: ...
    def prefetch(self, path: str, ranges: Sequence[tuple[int, int]] | None) -> None: ...
    def size(self, path: str) -> int: ...
    def put(self, path: str, data: bytes) -> None: ...
    def put_file(self, path: str, local_path: str | os.PathLike[str]) -> None: ...
    def put_if_absent(self, path: str, data: bytes) -> bool: ...
    def modified(self, path: str) -> float: ...
    def exists(self, path: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, path: str) -> None: ...
    def clean_incomplete(self, prefix: str) -> int: ...
    def move_file(self, path: str, local_path: str | os.PathLike[str]) -> None: ...
    def scratch_dir(self) -> Path | None: ...
    def url_of(self, path: str) -> str: ...
    def local_path(self, path: str) -> Path | None: ...


def is_s3_url(url: str) -> bool:
    return str(url).startswith("s3://")


def open_store(url: str | os.PathLike[str], *, create: bool = True) -> Store:
    """Open ``url`` (a folder or ``s3://bucket/prefix``) as a store.

    Raises:
        StoreError: the folder cannot be created or the bucket cannot be reached.
    """
    url = str(url)
    if is_s3_url(url):
        from pneumo.shards.s3 import S3Store  # boto3 and its settings only where S3 is used

        return S3Store.from_url(url)
    return LocalStore(Path(url), create=create)


def _split_url(url: str) -> tuple[str, str]:
    """``s3://b/dir/x.pt`` -> (``s3://b/dir``, ``x.pt``); a local path -> (folder, name)."""
    if not is_s3_url(url):
        path = Path(url).expanduser()
        return str(path.parent), path.name
    parent, _, name = str(url).rstrip("/").rpartition("/")
    if not name or parent in ("s3:/", "s3:"):
        raise StoreError(f"{url!r} does not name an object")
    return parent, name


def read_url(url: str) -> bytes:
    """The bytes of a local file or an ``s3://bucket/key`` object.

    Raises:
        StoreError: it does not exist or cannot be read.
    """
    if is_s3_url(url):
        parent, name = _split_url(url)
        return open_store(parent, create=False).get(name)
    try:
        return Path(url).expanduser().read_bytes()
    except OSError as e:
        raise StoreError(f"cannot read {url}: {e.strerror}") from e


def write_url(url: str, data: bytes) -> None:
    """Write ``data`` atomically to a local file or an ``s3://bucket/key`` object."""
    parent, name = _split_url(url)
    open_store(parent).put(name, data)


def create_temp(directory: str | os.PathLike[str], prefix: str, suffix: str) -> tuple[int, str]:
    """A new empty file in ``directory``: ``(fd open for writing, path)``.

    Unlike ``tempfile.mkstemp`` (always 0600) the file is created with mode 0666 less the
    umask, so a file renamed into place reads like any other file the user writes.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise StoreError(f"cannot create a temporary file in {directory}")


def _fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename, a new file or folder) durable."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows: folders cannot be opened, nor need it
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with the file it was about: a full disk reported by write() or fsync() names
    none, and the one-line error should say which file could not be written."""
    return e if e.filename is not None else OSError(e.errno, e.strerror, str(path))


def _write_temp(target: Path, data: bytes) -> str:
    """``data`` in a new, synced temp file beside ``target``; its path. Dot-prefixed temp
    names are skipped by listings (and by pyarrow.dataset): a half-written file is never read.

    Raises:
        OSError: naming ``target`` (a full disk says which file could not be written).
    """
    try:
        _make_dirs(target.parent)
        fd, tmp = create_temp(target.parent, f".{target.name}.", ".tmp")
    except OSError as e:
        raise _named(e, target) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _named(e, target) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _make_dirs(directory: Path) -> None:
    """``mkdir -p``, durably: the parent of every folder created is fsynced."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)  # another uploader thread may have made it meanwhile
        _fsync_dir(folder.parent)


class FileRange(io.RawIOBase):
    """Bytes ``[start, end)`` of a local file opened for reading (closed with it), read
    like a whole stream."""

    def __init__(self, file: IO[bytes], start: int, end: int) -> None:
        super().__init__()
        self.file = file
        self.file.seek(start)
        self.left = end - start

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        n = self.left if size is None or size < 0 else min(size, self.left)
        data = self.file.read(n) if n > 0 else b""
        self.left -= len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.file.close()
        super().close()


def clean_path(path: str) -> str:
    """``path`` relative to a store root, with ``/``; one that leaves the root is an error."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise StoreError(f"path {path!r} leaves the store root")
    return "/".join(parts)


class LocalStore:
    """A folder on the local file system."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create folder {self.root}: {e.strerror}") from e
        elif not self.root.is_dir():
            raise StoreError(f"{self.root} is not a folder")
        self.url = str(self.root)

    def _p(self, path: str) -> Path:
        return self.root / clean_path(path)

    def url_of(self, path: str) -> str:
        return str(self._p(path))

    def local_path(self, path: str) -> Path | None:
        return self._p(path)

    def get(self, path: str) -> bytes:
        try:
            return self._p(path).read_bytes()
        except FileNotFoundError as e:
            raise StoreError(f"{self._p(path)} does not exist") from e

    def open_read(self, path: str) -> IO[bytes]:
        try:
            return open(self._p(path), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError as e:
            raise StoreError(f"{self._p(path)} does not exist") from e

    def open_range(self, path: str, start: int, end: int) -> IO[bytes]:
        """Bytes ``[start, end)`` of a file, as a stream."""
        try:
            file = open(self._p(path), "rb")  # noqa: SIM115 - closed with the range
        except FileNotFoundError as e:
            raise StoreError(f"{self._p(path)} does not exist") from e
        return FileRange(file, start, end)  # type: ignore[return-value]

    def prefetch(self, path: str, ranges: Sequence[tuple[int, int]] | None) -> None:
        """Nothing to do: a local read has no latency worth hiding."""

    def size(self, path: str) -> int:
        """Bytes of the file at ``path``."""
        try:
            return self._p(path).stat().st_size
        except FileNotFoundError as e:
            raise StoreError(f"{self._p(path)} does not exist") from e

    def put(self, path: str, data: bytes) -> None:
        target = self._p(path)
        tmp = _write_temp(target, data)
        try:
            os.replace(tmp, target)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise _named(e, target) from e
        _fsync_dir(target.parent)

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists; True if this call created it.

        Atomic against any number of writers: the file is written under a temp name and
        hard-linked into place, which fails when the name is taken (two writers racing
        to create the same lease or settings file: exactly one wins).
        """
        target = self._p(path)
        tmp = _write_temp(target, data)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError as e:
            raise _named(e, target) from e
        finally:
            Path(tmp).unlink(missing_ok=True)
        _fsync_dir(target.parent)
        return True

    def scratch_dir(self) -> Path | None:
        """A hidden folder inside the store, so finished files can be renamed into place."""
        d = self.root / ".scratch"
        d.mkdir(exist_ok=True)
        return d

    def move_file(self, path: str, local_path: str | os.PathLike[str]) -> None:
        """Like ``put_file`` but may consume ``local_path`` (a rename when possible).

        The file keeps its mode: create it with :func:`create_temp`, not ``mkstemp``.
        """
        target = self._p(path)
        _make_dirs(target.parent)
        _fsync_file(local_path)
        try:
            os.replace(local_path, target)
        except OSError:  # another file system: copy, then drop the original
            self.put_file(path, local_path)
            Path(local_path).unlink(missing_ok=True)
            return
        _fsync_dir(target.parent)

    def put_file(self, path: str, local_path: str | os.PathLike[str]) -> None:
        target = self._p(path)
        _make_dirs(target.parent)
        fd, tmp = create_temp(target.parent, f".{target.name}.", ".tmp")
        try:
            with os.fdopen(fd, "wb") as dst, open(local_path, "rb") as src:
                shutil.copyfileobj(src, dst, 1024 * 1024)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise _named(e, target) from e
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def exists(self, path: str) -> bool:
        return self._p(path).exists()

    def modified(self, path: str) -> float:
        """When ``path`` was last written (seconds since the epoch)."""
        try:
            return self._p(path).stat().st_mtime
        except FileNotFoundError as e:
            raise StoreError(f"{self._p(path)} does not exist") from e

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix) if prefix else self.root
        if base.is_file():
            return [clean_path(prefix)]
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            rel = p.relative_to(self.root).as_posix()
            # Hidden names are work in progress (temp files, the ingest scratch folder).
            if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
                out.append(rel)
        return sorted(out)

    def delete(self, path: str) -> None:
        self._p(path).unlink(missing_ok=True)

    def clean_incomplete(self, prefix: str) -> int:
        """Delete the temp files that killed writes left under ``prefix``; returns how many."""
        base = self._p(prefix) if prefix else self.root
        if not base.is_dir():
            return 0
        stale = [p for p in base.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)
