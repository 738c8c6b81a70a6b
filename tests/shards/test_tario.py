"""Our shards are plain WebDataset shards: webdataset itself reads them, byte for byte."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from pneumo.shards.tario import ShardWriter, byte_ranges, member_header


def test_webdataset_reads_our_shards(tmp_path):
    samples = [
        {
            "__key__": f"1_2_3_{i}",
            "jpg": bytes([i]) * (700 + i),
            "mask.png": b"m" * i,
            "json": b'{"i": %d}' % i,
        }
        for i in range(5)
    ]
    writer = ShardWriter("x.tar", tmp_path)
    for s in samples:
        writer.write(s)
    writer.close()
    # A local path, never a "pipe:" URL: nothing is executed.
    got = list(wds.WebDataset(writer.tmp_path, shardshuffle=False))
    assert [g["__key__"] for g in got] == [s["__key__"] for s in samples]
    for g, s in zip(got, samples, strict=True):
        assert g["jpg"] == s["jpg"] and g["mask.png"] == s["mask.png"] and g["json"] == s["json"]


def test_same_samples_same_bytes(tmp_path):
    def write(name: str) -> bytes:
        w = ShardWriter(name, tmp_path)
        w.write({"__key__": "k", "png": b"x" * 1000, "json": b"{}"})
        w.close()
        with open(w.tmp_path, "rb") as f:
            return f.read()

    assert write("a.tar") == write("b.tar")


def test_a_span_holds_exactly_its_samples_members_even_after_assembly(tmp_path):
    """Pieces concatenated into a shard (as ingest does) keep their samples' spans, shifted."""
    samples = [
        {"__key__": f"k{i}", "jpg": bytes([i]) * (300 + 700 * i), "json": b"{}"} for i in range(6)
    ]
    pieces = []
    for part in (samples[:2], samples[2:3], samples[3:]):
        w = ShardWriter("piece", tmp_path)
        for s in part:
            w.write(s)
        pieces.append(w.close())
    shard = ShardWriter("x.tar", tmp_path)
    for piece in pieces:
        shard.append(piece)
    shard.close()
    data = Path(shard.tmp_path).read_bytes()
    assert sorted(shard.spans) == [s["__key__"] for s in samples]
    ends = []
    for s in samples:
        offset, size = shard.spans[s["__key__"]]
        ends.append(offset + size)
        with tarfile.open(fileobj=io.BytesIO(data[offset : offset + size])) as tf:
            got = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        assert got == {f"{s['__key__']}.jpg": s["jpg"], f"{s['__key__']}.json": b"{}"}
    # Spans tile the members: each sample starts where the previous one ends.
    assert [shard.spans[s["__key__"]][0] for s in samples] == [0, *ends[:-1]]


def test_adjacent_spans_merge_into_one_range():
    assert byte_ranges([(1024, 512), (0, 1024), (4096, 100), (2048, 10)]) == [
        (0, 1536),
        (2048, 2058),
        (4096, 4196),
    ]
    assert byte_ranges([]) == []


def test_member_headers_are_tarfiles_bytes() -> None:
    """The hand-built header (ingest's hot path) against tarfile's own, for the names and
    sizes that change its fields: name lengths up to the 100-byte field and past it (tarfile
    splits those into prefix + name), non-ASCII names, sizes around block and octal limits."""
    names = ["a", "k.json", "x" * 99 + "y", "x" * 100, "d" * 40 + "/" + "x" * 90 + ".jpg", "é.png"]
    names += [f"{'ab' * n}.mask.png" for n in range(0, 46, 5)]  # up to 99 bytes
    for name in names:
        for size in (0, 1, 511, 512, 513, 123_456, 8**11 - 1):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o444
            info.uname = info.gname = "pneumo"
            expected = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            assert member_header(name, size) == expected, (name, size)
    with pytest.raises(ValueError, match="overflow"):  # USTAR holds sizes < 8 GiB, as tarfile
        member_header("big.bin", 8**11)
    # And tarfile reads what the fast path wrote.
    header = member_header("key0001.mask.png", 1234)
    parsed = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    assert (parsed.name, parsed.size, parsed.mode, parsed.uname) == (
        "key0001.mask.png", 1234, 0o444, "pneumo",
    )  # fmt: skip
