"""Writing WebDataset tar shards, with deterministic bytes.

A shard is a plain POSIX tar whose members are grouped by key (``KEY.jpg``, ``KEY.json``,
...), which is all the WebDataset format is: ``webdataset.WebDataset`` reads our shards
as they are (tests/shards/test_tario.py checks it). The writer is the standard library's
``tarfile`` rather than webdataset's: importing webdataset pulls in torch (1.5 s at every
ingest start) and its writer is twice as slow per sample.

Writing goes to a local temporary file first and is then put into the store by a
background uploader, so the slow part of S3 (latency, multipart) overlaps with decoding
the next shard's images. Reading is ``shards.stream.read_shard``.
"""

from __future__ import annotations

import logging
import os
import tarfile
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.store import Store

log = logging.getLogger(__name__)

Sample = dict[str, Any]  # {"__key__": str, "jpg" | "png": bytes, "mask.png": bytes, "json": bytes}


@dataclass(frozen=True)
class Piece:
    """The members of a finished shard file, without its end-of-archive blocks."""

    tmp_path: str
    data_end: int  # bytes of members; the end-of-archive blocks follow
    count: int
    nbytes: int


class ShardWriter:
    """One tar shard being written to a local temporary file.

    Members are written as USTAR headers + data + padding, exactly what ``tarfile`` writes,
    without its per-member overhead. A shard can also be assembled from pieces (finished
    shards of the same format) by copying their member bytes: how ingest merges the
    work of its processes into large shards.
    """

    def __init__(self, path: str, tmp_dir: str | os.PathLike[str]) -> None:
        self.path = path
        fd, self.tmp_path = tempfile.mkstemp(dir=tmp_dir, suffix=".tar")
        self._file = os.fdopen(fd, "wb")
        self.count = 0
        self.nbytes = 0  # member data, headers excluded
        self.data_end = 0

    def write(self, sample: Sample) -> None:
        """Write one sample: ``{"__key__": KEY, SUFFIX: bytes, ...}``, members sorted."""
        key = sample["__key__"]
        for suffix in sorted(k for k in sample if not k.startswith("_")):
            data = sample[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            # Fixed owner, mode and mtime: the same samples give the same bytes, every run.
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "pneumo"
            header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            padding = -len(data) % tarfile.BLOCKSIZE
            self._file.write(header)
            self._file.write(data)
            self._file.write(b"\0" * padding)
            self.data_end += len(header) + len(data) + padding
            self.nbytes += len(data)
        self.count += 1

    def append(self, piece: Piece) -> None:
        """Copy the members of ``piece`` (then delete its file)."""
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
        return Piece(self.tmp_path, self.data_end, self.count, self.nbytes)


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
