"""Writing and reading WebDataset tar shards, with deterministic bytes.

Writing goes to a local temporary file first and is then put into the store by a
background uploader, so the slow part of S3 (latency, multipart) overlaps with decoding
the next shard's images. Reading takes any binary stream (a local file or boto3's
streaming body): no ``pipe:`` URL is ever built, so nothing from data is executed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from shards.store import Store

log = logging.getLogger(__name__)

Sample = dict[str, Any]  # {"__key__": str, "jpg" | "png": bytes, "mask.png": bytes, "json": bytes}


class ShardWriter:
    """One tar shard being written; ``close()`` returns its size and sample count."""

    def __init__(self, path: str, tmp_dir: str) -> None:
        self.path = path
        fd, self.tmp_path = tempfile.mkstemp(dir=tmp_dir, suffix=".tar")
        self._file = os.fdopen(fd, "wb")
        # Fixed user, group and mtime: the same samples give the same bytes, every run.
        self._tar = wds.TarWriter(self._file, user="pneumo", group="pneumo", mtime=0, encoder=False)
        self.count = 0
        self.nbytes = 0

    def write(self, sample: Sample) -> None:
        self.nbytes += self._tar.write(sample)
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


def iter_tar(stream: IO[bytes], url: str) -> Iterator[Sample]:
    """Samples of one tar stream, grouped by key (webdataset's own tar iteration)."""
    files = tar_file_expander([{"url": url, "stream": stream}], eof_value={})
    yield from group_by_keys(files)


def iter_shards(
    store: Store,
    paths: Iterable[str],
    keep: Callable[[str], bool] | None = None,
) -> Iterator[Sample]:
    """Stream the samples of ``paths`` from ``store``, in order, closing each stream."""
    for path in paths:
        stream = store.open_read(path)
        try:
            for sample in iter_tar(stream, path):
                if keep is None or keep(sample["__key__"]):
                    sample["__shard__"] = path
                    yield sample
        finally:
            stream.close()
