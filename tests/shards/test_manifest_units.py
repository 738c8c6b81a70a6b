"""The manifest's small helpers, each against an independent computation: the fingerprint
that names a run's rows, Parquet parts, the not-a-dataset check and how tables open."""

from __future__ import annotations

import hashlib
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pneumo.shards import commits, layout, manifest
from pneumo.shards.errors import ManifestError
from pneumo.shards.store import open_store


def _rows(n: int, dataset: str = "siim") -> list[dict]:
    return [
        {
            "dataset": dataset,
            "key": f"k{i:03d}",
            "image_id": f"img{i}",
            "batch": "b1",
            "content_sha256": hashlib.sha256(str(i).encode()).hexdigest(),
            "has_ptx": i % 2 == 0,
            "split": "train",
        }
        for i in range(n)
    ]


def _expected_fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["key"]):
        h.update(f"{r['dataset']}/{r['key']}/{r['content_sha256']}\n".encode())
    return h.hexdigest()[:16]


def test_the_fingerprint_is_the_documented_hash_of_the_selected_samples():
    rows = _rows(7)
    shuffled = random.Random(3).sample(rows, len(rows))
    got = manifest.fingerprint(manifest.to_table(shuffled))
    assert got == _expected_fingerprint(rows)
    assert manifest.fingerprint(pa.Table.from_pylist(shuffled)) == got  # row order: no matter
    # What a run trained on changes when any sample, its bytes or its dataset changes.
    other_bytes = [dict(r) for r in rows]
    other_bytes[4]["content_sha256"] = "0" * 64
    other_dataset = [dict(r, dataset="nih") if r["key"] == "k000" else r for r in rows]
    fingerprints = {
        got,
        manifest.fingerprint(manifest.to_table(rows[:-1])),
        manifest.fingerprint(manifest.to_table(other_bytes)),
        manifest.fingerprint(manifest.to_table(other_dataset)),
    }
    assert len(fingerprints) == 4
    # A label is not part of it: relabelling does not make another selection.
    relabelled = [dict(r, has_ptx=not r["has_ptx"]) for r in rows]
    assert manifest.fingerprint(manifest.to_table(relabelled)) == got


def test_a_part_is_one_zstd_parquet_file_with_the_rows(tmp_path):
    store = open_store(tmp_path)
    table = manifest.to_table(_rows(5))
    manifest.write_part(store, "manifest/part.parquet", table)
    written = pq.ParquetFile(tmp_path / "manifest" / "part.parquet")
    assert written.metadata.row_group(0).column(0).compression == "ZSTD"
    assert written.read().equals(table)
    assert [p.name for p in (tmp_path / "manifest").iterdir()] == ["part.parquet"]  # no temp


def test_a_folder_that_was_never_a_dataset_is_refused_by_name(tmp_path):
    store = open_store(tmp_path / "typo", create=True)
    store.put("notes/readme.txt", b"files of something else")  # a folder, not a dataset
    with pytest.raises(ManifestError) as e:
        manifest.require_dataset(store)
    assert str(e.value).startswith(f"{store.url} is not a pneumo dataset (no _pneumo.json")
    assert "give the --out folder or s3:// prefix of `pneumo ingest`" in str(e.value)
    with pytest.raises(ManifestError, match="is not a pneumo dataset"):
        manifest.read(store)
    assert manifest.read(store, new_ok=True).num_rows == 0


@pytest.mark.parametrize(
    "path",
    [layout.SETTINGS_FILE, f"{layout.MANIFEST_DIR}/x.json", f"{layout.SHARDS_DIR}/siim/b/x.tar"],
)
def test_any_one_sign_of_a_dataset_is_enough(tmp_path, path):
    store = open_store(tmp_path, create=True)
    store.put(path, b"{}")
    manifest.require_dataset(store)  # no error: a first batch may be under way


def test_open_dataset_finds_the_table_the_legacy_parts_or_nothing(tmp_path):
    empty = open_store(tmp_path / "empty", create=True)
    assert manifest.open_dataset(empty) is None
    delta = open_store(tmp_path / "delta", create=True)
    commits.ensure_table(delta, "samples")
    opened = manifest.open_dataset(delta)
    assert opened is not None and opened.to_table().num_rows == 0
    assert manifest.open_dataset(delta, "quarantine") is None  # only samples was created
    assert manifest.open_dataset(delta, version=0) is not None
    legacy = open_store(tmp_path / "legacy", create=True)
    rows = _rows(3)
    part = manifest.to_table(rows).drop_columns(["dataset", "batch"])
    manifest.write_part(legacy, layout.manifest_part("siim", "b1"), part)
    old = manifest.open_dataset(legacy)
    assert old is not None
    got = old.to_table().sort_by("key")
    assert got.column("key").to_pylist() == ["k000", "k001", "k002"]
    assert set(got.column("dataset").to_pylist()) == {"siim"}
    assert set(got.column("batch").to_pylist()) == {"b1"}


def test_first_line_is_the_first_line_or_the_type():
    assert manifest.first_line(ValueError("  one\ntwo\n")) == "one"
    assert manifest.first_line(KeyError()) == "KeyError"
    assert manifest.first_line(OSError("x" * 400)) == "x" * 300
