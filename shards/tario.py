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

import io
import logging
import os
import tarfile
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shards.store import Store

log = logging.getLogger(__name__)

Sample = dict[str, Any]  # {"__key__": str, "jpg" | "png": bytes, "mask.png": bytes, "json": bytes}


class ShardWriter:
    """One tar shard being written to a local temporary file."""

    def __init__(self, path: str, tmp_dir: str | os.PathLike[str]) -> None:
        self.path = path
        fd, self.tmp_path = tempfile.mkstemp(dir=tmp_dir, suffix=".tar")
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.nbytes = 0

    def write(self, sample: Sample) -> None:
        """Write one sample: ``{"__key__": KEY, SUFFIX: bytes, ...}``, members sorted."""
        key = sample["__key__"]
        for suffix in sorted(k for k in sample if not k.startswith("_")):
            data = sample[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            # Fixed owner, mode and mtime: the same samples give the same bytes, every run.
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "pneumo"
            self._tar.addfile(info, io.BytesIO(data))
            self.nbytes += len(data)
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._file.close()


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
