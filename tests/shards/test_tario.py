"""Our shards are plain WebDataset shards: webdataset itself reads them, byte for byte."""

from __future__ import annotations

import webdataset as wds

from shards.tario import ShardWriter


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
