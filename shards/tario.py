"""Writing WebDataset tar shards, with deterministic bytes.

A shard is a plain POSIX tar whose members are grouped by key (``KEY.jpg``, ``KEY.json``,
...), which is all the WebDataset format is: ``webdataset.WebDataset`` reads our shards
as they are (tests/shards/test_tario.py checks it). The writer is the standard library's
``tarfile`` rather than webdataset's: importing webdataset pulls in torch (1.5 s at every
ingest start) and its writer is twice as slow per sample.

Writing goes to a local temporary file first and is then put into the store by a
background uploader, so the slow part of S3 (latency, multipart) overlaps with decoding
the next shard's images. The writer records where each sample lies in its shard (its
``span``: the byte offset of its first header and the size of all its members, padding
included), which the manifest keeps so a reader can fetch one sample, or a run of adjacent
ones, with a ranged read (:func:`read_samples`). Which samples to read is
``pneumo.shards.stream``'s.
"""

from __future__ import annotations

import logging
import os
import tarfile
import threading
from collections.abc import Container, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from pneumo.shards.store import Store, create_temp

log = logging.getLogger(__name__)

# {"__key__": str, "jpg" | "png" | "npy.gz": bytes, "mask.png": bytes, "json": bytes}
Sample = dict[str, Any]
Span = tuple[int, int]  # (offset of the sample's first header, bytes of all its members)

# tarfile reads its stream in blocks of this size; it also copies what is left of a block on
# every read, so a larger block costs more than it saves.
TAR_BLOCK = 64 * 1024


ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _reference_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    # Fixed owner, mode and mtime: the same samples give the same bytes, every run.
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uname = info.gname = "pneumo"
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


# The USTAR header fields that are the same for every member pneumo writes, taken from
# tarfile's own header (so the bytes stay tarfile's on every Python version): mode, uid and
# gid (100:124), mtime (136:148), and everything after the checksum (156:512).
_TEMPLATE = _reference_header("x", 0)
_OWNER, _MTIME, _REST = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]
_FIXED_SUM = sum(_OWNER) + sum(_MTIME) + sum(_REST) + 8 * ord(" ")  # checksum field: spaces


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file, byte for byte what ``tarfile`` writes
    for pneumo's members (mode 0444, mtime 0, owner ``pneumo``), built from fixed parts:
    ``TarInfo.tobuf`` costs ~17 us a member (three a sample), this ~1 us."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raw = b""
    if not raw or len(raw) > 100 or size >= 8**11:  # long names, lone surrogates, 8 GB+
        return _reference_header(name, size)
    size_field = b"%011o\0" % size
    checksum = _FIXED_SUM + sum(raw) + sum(size_field)
    return b"".join(
        (raw.ljust(100, b"\0"), _OWNER, size_field, _MTIME, b"%06o\0 " % checksum, _REST)
    )


@dataclass(frozen=True)
class Piece:
    """The members of a finished shard file, without its end-of-archive blocks."""

    tmp_path: str
    data_end: int  # bytes of members; the end-of-archive blocks follow
    count: int
    nbytes: int
    spans: dict[str, Span] = field(default_factory=dict)  # key -> its first copy's span


class ShardWriter:
    """One tar shard being written to a local temporary file.

    Members are written as USTAR headers + data + padding, exactly what ``tarfile`` writes,
    without its per-member overhead. A shard can also be assembled from pieces (finished
    shards of the same format) by copying their member bytes: how ingest merges the
    work of its processes into large shards.
    """

    def __init__(self, path: str, tmp_dir: str | os.PathLike[str]) -> None:
        self.path = path
        # Not mkstemp: its 0600 would follow the file into the store (see create_temp).
        fd, self.tmp_path = create_temp(tmp_dir, ".shard-", ".tar")
        self._file = os.fdopen(fd, "wb")
        self.count = 0
        self.nbytes = 0  # member data, headers excluded
        self.data_end = 0
        # Where each key's first copy lies. An image given twice in one ingest batch can be
        # written twice (in two units); the manifest references the first copy.
        self.spans: dict[str, Span] = {}

    def write(self, sample: Sample) -> Span:
        """Write one sample: ``{"__key__": KEY, SUFFIX: bytes, ...}``, members sorted.

        Returns its span in the shard: ``(offset, size)``.
        """
        key = sample["__key__"]
        start = self.data_end
        parts: list[bytes] = []
        for suffix in sorted(k for k in sample if not k.startswith("_")):
            data = sample[suffix]
            header = member_header(f"{key}.{suffix}", len(data))
            parts += (header, data, ZERO_BLOCK[: -len(data) % tarfile.BLOCKSIZE])
            self.data_end += len(header) + len(data) + len(parts[-1])
            self.nbytes += len(data)
        self._file.write(b"".join(parts))  # one call: the buffered writer's per-call cost
        self.count += 1
        span = (start, self.data_end - start)
        self.spans.setdefault(key, span)
        return span

    def append(self, piece: Piece) -> None:
        """Copy the members of ``piece`` (then delete its file); its spans move with them."""
        for key, (offset, size) in piece.spans.items():
            self.spans.setdefault(key, (self.data_end + offset, size))
        with open(piece.tmp_path, "rb") as src:
            self._file.flush()
            try:  # in the kernel, no trip through Python
                copied = 0
                while copied < piece.data_end:
                    n = os.copy_file_range(
                        src.fileno(), self._file.fileno(), piece.data_end - copied
                    )
                    if n == 0:
                        raise OSError(f"{piece.tmp_path} is shorter than {piece.data_end} bytes")
                    copied += n
            except (AttributeError, OSError) as e:  # no copy_file_range here: plain copy
                if copied:
                    raise OSError(f"copying {piece.tmp_path} failed half-way") from e
                self._file.write(src.read(piece.data_end))
        Path(piece.tmp_path).unlink(missing_ok=True)
        self.data_end += piece.data_end
        self.count += piece.count
        self.nbytes += piece.nbytes

    def close(self) -> Piece:
        """End the archive (two zero blocks, padded to a 10 KiB record, as tarfile does)."""
        end = self.data_end + 2 * tarfile.BLOCKSIZE
        self._file.write(b"\0" * (end - self.data_end + (-end % tarfile.RECORDSIZE)))
        self._file.close()
        return Piece(self.tmp_path, self.data_end, self.count, self.nbytes, dict(self.spans))


class ShardUploader:
    """Puts finished shards into the store in the background, a few at a time.

    ``wait()`` re-raises the first upload error, so a batch is never committed with a
    shard missing.
    """

    def __init__(self, store: Store, max_in_flight: int = 4) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="upload")
        self._slots = threading.BoundedSemaphore(max_in_flight * 2)
        self._futures: list[Future[None]] = []

    def submit(self, writer: ShardWriter) -> None:
        writer.close()
        self._slots.acquire()  # back-pressure: never more than a few shards on local disk
        self._futures.append(self._pool.submit(self._upload, writer))

    def _upload(self, writer: ShardWriter) -> None:
        try:
            self.store.move_file(writer.path, writer.tmp_path)
            log.debug("stored %s (%d samples, %d bytes)", writer.path, writer.count, writer.nbytes)
        finally:
            Path(writer.tmp_path).unlink(missing_ok=True)
            self._slots.release()

    def wait(self) -> None:
        try:
            for f in self._futures:
                f.result()
        finally:
            self._pool.shutdown(wait=True)


# ---------------------------------------------------------------- reading


class Spanned(Protocol):
    """Where a sample lies in its shard (``pneumo.shards.stream.Entry`` is one); None: unknown."""

    offset: int | None
    size: int | None


def read_samples(store: Store, path: str, wanted: Mapping[str, Spanned]) -> Iterator[Sample]:
    """The samples of shard ``path`` whose keys are in ``wanted``, in tar order.

    Where every wanted sample has a span, only their bytes are read: one ranged read per
    run of adjacent samples. Otherwise the shard is streamed from its start, the members
    of other keys skipped by their header (never copied out), until every wanted sample
    has come. Each key is yielded at most once: the copy at its span (only spans are
    read), or without spans the first copy (a shard can hold a stray second copy of an
    image given twice to one ingest batch).

    Raises:
        tarfile.TarError: the bytes are not a tar archive.
    """
    spans = [(e.offset, e.size) for e in wanted.values()]
    done: set[str] = set()
    if all(offset is not None and size is not None for offset, size in spans):
        for start, end in byte_ranges(spans):  # type: ignore[arg-type]
            with closing(store.open_range(path, start, end)) as stream:
                yield from _grouped(members(stream, wanted), path, wanted, done)
    else:
        with closing(store.open_read(path)) as stream:
            yield from _grouped(members(stream, wanted), path, wanted, done)


def _grouped(
    found: Iterator[tuple[str, str, bytes | None]],
    path: str,
    wanted: Mapping[str, Spanned],
    done: set[str],
) -> Iterator[Sample]:
    """Members grouped into samples; keys in ``done`` (already yielded) are skipped, and
    nothing more is read once every wanted key is done."""
    current: Sample | None = None
    for key, suffix, data in found:
        ours = data is not None
        if ours and current is not None and current["__key__"] == key and suffix not in current:
            current[suffix] = data
            continue
        if current is not None:  # another sample (or another copy of this key) starts
            yield current
            current = None
        if len(done) == len(wanted):
            return  # the rest of the stream is not needed
        if ours and key not in done:
            done.add(key)
            current = {"__key__": key, "__shard__": path, suffix: data}
    if current is not None:
        yield current


def members(stream: IO[bytes], keys: Container[str]) -> Iterator[tuple[str, str, bytes | None]]:
    """``(key, suffix, data)`` of each regular member of a tar stream, in tar order;
    ``data`` is None for members whose key is not in ``keys``: their bytes are read past,
    never kept.

    ``stream`` may be a whole shard or a run of whole samples cut out of one (a ranged
    read; it then has no end-of-archive blocks, and ends quietly). A key is the member
    name up to the first dot of its base name, as webdataset splits it; suffixes are
    lower-cased.

    Plain USTAR members (all that :class:`ShardWriter` writes) are parsed here, with the
    checks ``tarfile`` makes (header checksum, whole data); from the first other header
    on (PAX, GNU long names: a shard written by another tool) ``tarfile`` reads the rest.
    ``tarfile``'s stream mode costs about 1 ms a sample in Python (the training stream's
    largest cost after decoding and warping): this parser, a read per header and one per
    member's data.

    Raises:
        tarfile.TarError: the stream is not a tar archive, or a member is cut short.
    """
    first = True
    while True:
        # What ends the members, and what is an error, as in tarfile.TarFile.next: past
        # the first header, a short or bad one ends the archive quietly (the stream's
        # reader notices what is missing).
        header = _read_exactly(stream, tarfile.BLOCKSIZE)
        if first and not header:
            raise tarfile.ReadError("empty file")
        if len(header) < tarfile.BLOCKSIZE:
            if first:
                raise tarfile.ReadError("truncated header")
            return  # the end of a ranged read
        if header == ZERO_BLOCK:
            return  # end-of-archive blocks
        if not _checksum_ok(header):
            if first:
                raise tarfile.ReadError("bad checksum")
            return
        plain = header[156:157] in (b"0", b"\0") and header[257:262] == b"ustar"
        if not plain or header[124] & 0x80:  # another type, or a base-256 size (8 GB+)
            yield from _tarfile_members(_Prepended(header, stream), keys)
            return
        first = False
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise tarfile.ReadError("invalid size field") from None
        path = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
        key, suffix = _split_name(path)
        data = _read_exactly(stream, size)
        ours = key in keys
        if len(data) < size and ours:
            raise tarfile.ReadError("unexpected end of data")
        yield key, suffix, (data if ours else None)
        pad = -size % tarfile.BLOCKSIZE
        if len(data) < size or len(_read_exactly(stream, pad)) < pad:  # cut before the next header
            raise tarfile.ReadError("unexpected end of data")


def _tarfile_members(
    stream: IO[bytes], keys: Container[str]
) -> Iterator[tuple[str, str, bytes | None]]:
    """:func:`members` through ``tarfile`` (any tar: PAX and GNU headers too)."""
    tar = tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_BLOCK)  # noqa: SIM115
    for info in tar:
        tar.members = []  # stream mode would keep every header otherwise
        if not info.isreg():
            continue
        key, suffix = _split_name(info.name)
        if key not in keys:
            yield key, suffix, None
            continue
        member = tar.extractfile(info)
        data = member.read() if member is not None else b""
        yield key, suffix, data


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    """``n`` bytes of ``stream``, fewer only at its end."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _checksum_ok(header: bytes) -> bool:
    """Whether ``header``'s checksum field holds its checksum (its bytes summed, the field
    itself as spaces), unsigned or, as tarfile also accepts, signed (old tars summed signed
    chars)."""
    stored = _stored_checksum(header)
    unsigned = sum(header) - sum(header[148:156]) + 8 * ord(" ")
    if stored == unsigned:
        return True
    high = sum(b > 127 for b in header[:148]) + sum(b > 127 for b in header[156:])
    return stored == unsigned - 256 * high


def _stored_checksum(header: bytes) -> int:
    try:
        return int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return -1


class _Prepended:
    """``stream`` with ``head`` read first: hands tarfile a header already read here."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if n < 0:
            head, self._head = self._head, b""
            return head + self._stream.read()
        head, self._head = self._head[:n], self._head[n:]
        return head + (self._stream.read(n - len(head)) if len(head) < n else b"")


def _split_name(name: str) -> tuple[str, str]:
    head, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{head}/{key}" if head else key), suffix.lower()


def byte_ranges(spans: Iterable[Span]) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges covering ``spans``, adjacent ones merged into one."""
    out: list[tuple[int, int]] = []
    for offset, size in sorted(spans):
        if out and offset <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], offset + size))
        else:
            out.append((offset, offset + size))
    return out
