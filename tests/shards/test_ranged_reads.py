"""Read only what you need: byte spans in the manifest, ranged reads, stray copies, schema 1.

A byte-counting store wraps the local one: every byte the stream pulls from a shard is
counted, and compared with the bytes of the samples it delivers.
"""

from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pneumo.shards import layout, manifest, stream
from pneumo.shards.store import open_store
from pneumo.shards.tario import ShardWriter


class CountingStore:
    """A store that counts the bytes read through it and remembers every read."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.bytes_read, self.reads = inner, 0, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_read(self, path: str) -> io.RawIOBase:
        self.reads.append((path, None))
        return _Counted(self.inner.open_read(path), self)

    def open_range(self, path: str, start: int, end: int) -> io.RawIOBase:
        self.reads.append((path, (start, end)))
        return _Counted(self.inner.open_range(path, start, end), self)


class _Counted(io.RawIOBase):
    def __init__(self, stream_: Any, store: CountingStore) -> None:
        super().__init__()
        self.stream, self.store = stream_, store

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self.stream.read(size)
        self.store.bytes_read += len(data)
        return data

    def close(self) -> None:
        self.stream.close()
        super().close()


def delivered(samples) -> int:
    return sum(len(v) for s in samples for k, v in s.items() if not k.startswith("__"))


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory: pytest.TempPathFactory, write_shards) -> Path:
    """3 shards of 40 samples, each a 20 kB image and a small JSON (like a chest X-ray's
    frame and metadata, scaled down)."""
    rng = np.random.default_rng(0)
    images = {f"k{i:03d}": rng.bytes(20_000) for i in range(120)}
    rows = [
        {"key": key, "image_id": key, "split": "train", "has_ptx": False, "dataset": "siim"}
        for key in images
    ]
    root = tmp_path_factory.mktemp("three") / "ds"
    write_shards(
        root, rows, lambda r: {"jpg": images[r["key"]], "json": b"{}"}, per_shard=40,
        one_shard=False,
    )  # fmt: skip
    return root


def _selected(root: Path, where: str | None = None) -> list[stream.Entry]:
    return stream.entries_from_table(manifest.read(open_store(str(root)), where))


def test_24_slots_over_3_shards_read_what_they_deliver(three_shards):
    selected = _selected(three_shards)
    assert len({e.shard for e in selected}) == 3
    world, workers, batch = 4, 6, 2
    steps = len(selected) // (batch * world)
    store = CountingStore(open_store(str(three_shards)))
    samples = []
    for rank in range(world):
        spec = stream.TrainSpec(
            epoch=1, rank=rank, world_size=world, workers=workers, batch_size=batch,
            steps_per_epoch=steps, total_steps=3 * steps,
        )  # fmt: skip
        samples += [
            s for _, b in stream.rank_stream(store, {stream.ALL: selected}, spec) for s in b
        ]
    assert store.bytes_read <= 1.3 * delivered(samples), (store.bytes_read, delivered(samples))
    assert Counter(s["__key__"] for s in samples) == Counter(e.key for e in selected)

    store = CountingStore(open_store(str(three_shards)))
    samples = []
    for rank in range(world):
        spec = stream.EvalSpec(rank=rank, world_size=world, workers=workers, batch_size=batch)
        for w in range(workers):
            samples += [s for b in stream.eval_stream(store, selected, spec, w) for s in b]
    assert store.bytes_read <= 1.3 * delivered(samples), (store.bytes_read, delivered(samples))
    assert sorted(s["__key__"] for s in samples) == sorted(e.key for e in selected)


def test_a_scattered_selection_reads_only_its_samples(three_shards):
    selected = [e for e in _selected(three_shards) if int(e.key[1:]) % 3 == 0]
    store = CountingStore(open_store(str(three_shards)))
    spec = stream.EvalSpec(batch_size=4)
    samples = [s for b in stream.eval_stream(store, selected, spec, 0) for s in b]
    assert len(samples) == 40
    assert store.bytes_read <= 1.3 * delivered(samples), (store.bytes_read, delivered(samples))


def test_adjacent_samples_are_one_read_and_whole_shards_one_stream_each(three_shards):
    everything = _selected(three_shards)
    store = CountingStore(open_store(str(three_shards)))
    list(stream.eval_stream(store, everything, stream.EvalSpec(batch_size=8), 0))
    assert len(store.reads) == 3  # one read per shard, from its first sample to its last
    for path, (start, end) in store.reads:
        in_shard = [e for e in everything if e.shard == path]
        assert start == 0 == min(e.offset for e in in_shard)
        assert end == max(e.offset + e.size for e in in_shard)
    # Keys 0-3 and 6-7 of the first shard: two runs of adjacent samples, two reads.
    shard = everything[0].shard
    wanted = {
        e.key: e for e in everything if e.shard == shard and int(e.key[1:]) in {0, 1, 2, 3, 6, 7}
    }
    store = CountingStore(open_store(str(three_shards)))
    assert [s["__key__"] for s in stream.read_shard(store, shard, wanted)] == sorted(wanted)
    by_key = {e.key: e for e in everything}
    assert store.reads == [
        (shard, (by_key["k000"].offset, by_key["k003"].offset + by_key["k003"].size)),
        (shard, (by_key["k006"].offset, by_key["k007"].offset + by_key["k007"].size)),
    ]


@pytest.mark.integration
def test_s3_reads_are_single_ranged_gets(three_shards, s3_bucket):
    import boto3

    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for path in sorted(p for p in three_shards.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"ds/{path.relative_to(three_shards).as_posix()}")
    store = open_store(f"{s3_bucket}/ds")
    selected = [e for e in _selected(three_shards) if int(e.key[1:]) % 40 in range(5, 12)]
    gets: list[str] = []  # the Range of every GET sent, by the client or the lean path
    store.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: gets.append(request.headers["Range"])
    )
    got = [
        s for b in stream.eval_stream(store, selected, stream.EvalSpec(batch_size=4), 0) for s in b
    ]
    assert [s["__key__"] for s in got] == [e.key for e in selected]
    spec = stream.EvalSpec(batch_size=4)
    local = open_store(str(three_shards))
    assert got == [s for b in stream.eval_stream(local, selected, spec, 0) for s in b]
    # 7 adjacent samples in each of the 3 shards: 3 GETs, each exactly their span.
    expected = []
    for shard in sorted({e.shard for e in selected}):
        run = [e for e in selected if e.shard == shard]
        expected.append(f"bytes={run[0].offset}-{run[-1].offset + run[-1].size - 1}")
    assert [g.decode() if isinstance(g, bytes) else g for g in gets] == expected


# ---------------------------------------------------------------- stray copies, schema 1


@pytest.fixture(scope="module")
def stray_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard assembled from two ingest pieces, as ingest does, where ``a`` and ``b``
    were given twice: the second copies follow (``b``'s right after its first)."""
    root = tmp_path_factory.mktemp("stray") / "ds"
    store = open_store(str(root))
    tmp = root.parent / "tmp"
    tmp.mkdir()
    first, second = ShardWriter("p1", tmp), ShardWriter("p2", tmp)
    for key in ("a", "b"):
        first.write({"__key__": key, "jpg": f"{key}-first".encode()})
    for key in ("b", "c", "a"):
        second.write({"__key__": key, "jpg": f"{key}-second".encode()})
    path = layout.shard_path("siim", "b0", "train", "neg", 0)
    shard = ShardWriter(path, tmp)
    shard.append(first.close())
    shard.append(second.close())
    store.move_file(path, shard.close().tmp_path)
    rows = [
        {"key": key, "image_id": key, "dataset": "siim", "batch": "b0", "shard": path,
         "split": "train", "has_ptx": False, "offset": shard.spans[key][0],
         "size": shard.spans[key][1]}
        for key in ("a", "b", "c")
    ]  # fmt: skip
    manifest.write_part(store, layout.manifest_part("siim", "b0"), manifest.to_table(rows))
    return root


def _as_schema_1(root: Path, out: Path) -> Path:
    """A copy of the dataset whose manifest is as schema 1 wrote it: no offset, no size."""
    shutil.copytree(root, out)
    rows = manifest.read(open_store(str(out))).to_pylist()
    shutil.rmtree(out / "manifest")  # schema 1: one hive Parquet part per batch
    for dataset, batch in {(r["dataset"], r["batch"]) for r in rows}:
        mine = [r for r in rows if (r["dataset"], r["batch"]) == (dataset, batch)]
        table = manifest.to_table(mine).drop_columns(["dataset", "batch", "offset", "size"])
        part = out / layout.manifest_part(dataset, batch)
        part.parent.mkdir(parents=True)
        pq.write_table(table.replace_schema_metadata({"pneumo.schema_version": "1"}), part)
    return out


@pytest.mark.parametrize("schema", [2, 1])
def test_each_key_once_per_pass_despite_a_stray_copy(stray_copy, tmp_path, schema):
    root = stray_copy if schema == 2 else _as_schema_1(stray_copy, tmp_path / "v1")
    store = open_store(str(root))
    selected = _selected(root)
    assert [e.offset is None for e in selected] == [schema == 1] * 3
    expected = {"a": b"a-first", "b": b"b-first", "c": b"c-second"}  # the copies indexed
    got = [
        s for b in stream.eval_stream(store, selected, stream.EvalSpec(batch_size=2), 0) for s in b
    ]
    assert {s["__key__"]: s["jpg"] for s in got} == expected and len(got) == 3
    # Training: 2 epochs of 3 draws on 1 slot are 2 passes: each key once per epoch.
    for epoch in range(2):
        spec = stream.TrainSpec(epoch=epoch, batch_size=3, steps_per_epoch=1, total_steps=2)
        ((_, batch),) = stream.rank_stream(store, {stream.ALL: selected}, spec)
        assert sorted(s["__key__"] for s in batch) == ["a", "b", "c"]
        assert all(s["jpg"] == expected[s["__key__"]] for s in batch)


def test_schema_1_datasets_stream_the_same_samples(three_shards, tmp_path):
    old = _as_schema_1(three_shards, tmp_path / "v1")
    store = CountingStore(open_store(str(old)))
    selected = _selected(old)
    assert all(e.offset is None and e.size is None for e in selected)
    spec = stream.EvalSpec(world_size=2, rank=1, workers=2, batch_size=5)

    def keys(store_, entries, worker):
        return [
            [s["__key__"] for s in b] for b in stream.eval_stream(store_, entries, spec, worker)
        ]

    new_store = open_store(str(three_shards))
    for worker in range(2):
        assert keys(store, selected, worker) == keys(new_store, _selected(three_shards), worker)
    assert store.reads and all(span is None for _, span in store.reads)  # shards streamed
    # ... from their start, up to the last sample wanted: this slot's 30 samples are the
    # end of one shard and the start of the next, which is left early.
    opened = sum((old / path).stat().st_size for path, _ in store.reads)
    assert store.bytes_read < opened - 15 * 20_000
