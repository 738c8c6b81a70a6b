"""The manifest's byte spans, as ingest writes them: each names exactly its sample's members.

Shards are assembled from the pieces of several units (``shard_max_samples=4``, two
workers), and three images are given twice: ingest stores each once (a later unit's copy
is cut out of its piece), so every span must still name exactly its own sample's members.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import manifest, stream
from pneumo.shards.store import open_store

GIVEN_TWICE = (7, 11, 19)  # positions of the real files whose copies land beside them


@pytest.fixture(scope="module")
def dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    siim = shared_data / "siim"
    files = sorted(
        [*siim.glob("sample_images/*.dcm"), *siim.glob("dicom_train/*.dcm"),
         *siim.glob("stage2_test/*.dcm")]
    )  # fmt: skip
    tmp = tmp_path_factory.mktemp("spans")
    (tmp / "dcm").mkdir()
    for i, path in enumerate(files):
        shutil.copy(path, tmp / "dcm" / f"f{i:02d}.dcm")
    for i in GIVEN_TWICE:  # sorts right after the original: the next unit of 4 files
        shutil.copy(files[i], tmp / "dcm" / f"f{i:02d}z.dcm")
    batch = BatchConfig(out=str(tmp / "ds"), batch="b", shard_max_samples=4, workers=2)
    summary = ingest_siim(
        SiimConfig(dicom_root=str(tmp / "dcm"), labels=siim / "siim-pneumothorax-train-rle.csv.gz",
                   batch=batch)
    )  # fmt: skip
    assert summary.committed and summary.ingested == len(files)
    return tmp / "ds"


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]


def test_each_span_holds_exactly_its_samples_members(dataset):
    rows = manifest.read(open_store(str(dataset))).to_pylist()
    for shard in sorted({r["shard"] for r in rows}):
        with tarfile.open(dataset / shard) as tf:  # exactly once: no stray second copy
            assert max(Counter(m.name for m in tf.getmembers()).values()) == 1
    for row in rows:
        data = (dataset / row["shard"]).read_bytes()[row["offset"] : row["offset"] + row["size"]]
        members = _members(data)
        image = members.pop(f"{row['key']}.jpg", None) or members.pop(f"{row['key']}.png")
        assert hashlib.sha256(image).hexdigest() == row["content_sha256"]
        meta = json.loads(members.pop(f"{row['key']}.json"))
        assert meta["image_id"] == row["image_id"]
        labelled = row["has_ptx"] is not None  # negatives have an empty mask
        assert set(members) == ({f"{row['key']}.mask.png"} if labelled else set())


def test_the_stream_reads_every_ingested_sample_once(dataset):
    store = open_store(str(dataset))
    table = manifest.read(store)
    selected = stream.entries_from_table(table)
    keys, shas = table.column("key").to_pylist(), table.column("content_sha256").to_pylist()
    sha = dict(zip(keys, shas, strict=True))
    got = []
    for worker in range(3):
        spec = stream.EvalSpec(workers=3, batch_size=4)
        got += [s for batch in stream.eval_stream(store, selected, spec, worker) for s in batch]
    assert Counter(s["__key__"] for s in got) == Counter(keys)
    for s in got:
        image = s.get("jpg") or s["png"]
        assert hashlib.sha256(image).hexdigest() == sha[s["__key__"]]
