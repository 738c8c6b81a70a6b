"""The manifest and shards read by tools that are not pneumo, after a relabel: each gives
one row per image with the corrected labels (the README's one-liners, run as written).

Each reader runs in its own interpreter, as a user's script would (and so that a reader
that misbehaves at exit cannot take the test process with it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import manifest
from pneumo.shards.store import open_store

# Each prints the (image_id, has_ptx) rows of the current version, sorted, as JSON (a row
# given twice stays twice). URI: argv[1].
READERS = {
    "pandas": """
from deltalake import DeltaTable
df = DeltaTable(URI).to_pandas()
rows = sorted(zip(df["image_id"], df["has_ptx"].astype(object)))
""",
    "polars": """
import polars as pl
df = pl.read_delta(URI)
rows = sorted(zip(df["image_id"].to_list(), df["has_ptx"].to_list()))
""",
    "pyarrow": """
import pyarrow.fs as fs
from deltalake import DeltaTable
files = fs.SubTreeFileSystem(URI, fs.LocalFileSystem())
table = DeltaTable(URI).to_pyarrow_dataset(filesystem=files).to_table()
rows = sorted(zip(table["image_id"].to_pylist(), table["has_ptx"].to_pylist()))
""",
    "duckdb": """
import duckdb
import pyarrow.fs as fs
from deltalake import DeltaTable
files = fs.SubTreeFileSystem(URI, fs.LocalFileSystem())
manifest = DeltaTable(URI).to_pyarrow_dataset(filesystem=files)
rows = sorted(duckdb.sql("SELECT image_id, has_ptx FROM manifest").fetchall())
""",
}


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    script = f"import json, sys\nURI = sys.argv[1]\n{code}\nprint(json.dumps(rows))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def relabelled(shared_data, tmp_path_factory) -> tuple[Path, dict[str, bool]]:
    """A SIIM batch, then a --relabel batch flipping one positive image to negative."""
    sample = shared_data / "siim" / "sample_images"
    out = tmp_path_factory.mktemp("readers") / "ds"
    labels = sample / "train-rle-sample.csv"
    ingest_siim(SiimConfig(dicom_root=str(sample), labels=labels, batch=BatchConfig(out=str(out))))
    before = {r["image_id"]: r["has_ptx"] for r in manifest.read(open_store(out)).to_pylist()}
    flipped = sorted(i for i, ptx in before.items() if ptx)[0]
    rows = labels.read_text(encoding="utf-8-sig").splitlines()
    fixed = tmp_path_factory.mktemp("labels") / "fixed.csv"
    fixed.write_text("\n".join([r for r in rows if not r.startswith(flipped)] + [f"{flipped},-1"]))
    batch = BatchConfig(out=str(out), relabel=True)
    summary = ingest_siim(SiimConfig(dicom_root=str(sample), labels=fixed, batch=batch))
    assert summary.relabelled == 1
    return out, {**before, flipped: False}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_sees_one_row_per_image_with_the_new_labels(relabelled, reader):
    out, expected = relabelled
    assert _run(READERS[reader], str(out / "manifest")) == sorted(map(list, expected.items()))


WEBDATASET = """
import webdataset as wds
from deltalake import DeltaTable
df = DeltaTable(URI).to_pandas()
root = URI.removesuffix("manifest")
current = {(root + shard, key) for shard, key in zip(df["shard"], df["key"])}
urls = sorted({url for url, _ in current})
everything = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
mine = wds.WebDataset(urls, shardshuffle=False).select(
    lambda s: (s["__url__"], s["__key__"]) in current
)
rows = {"all": everything, "current": [s["__key__"] for s in mine]}
"""


def test_plain_webdataset_gives_every_stored_sample_and_the_manifest_restricts_it(relabelled):
    """A relabel stores the image again: the shards hold both samples, the old one in a
    shard other current rows still use. The README's recipe (the manifest's current
    (shard, key) pairs) yields each image once."""
    out, expected = relabelled
    got = _run(WEBDATASET, str(out / "manifest"))
    assert len(got["all"]) == len(expected) + 1  # the relabelled image, twice
    assert len(got["current"]) == len(set(got["current"])) == len(expected)


@pytest.mark.integration
def test_polars_and_deltalake_read_it_on_s3_with_only_the_aws_settings(shared_data, s3_bucket):
    """On S3 (the loopback server) with only the standard AWS variables (and
    AWS_ALLOW_HTTP, for a plain-HTTP endpoint), no storage_options."""
    sample = shared_data / "siim" / "sample_images"
    ds_url = s3_bucket + "/ds"
    ingest_siim(SiimConfig(dicom_root=str(sample), batch=BatchConfig(out=ds_url)))
    rows = manifest.read(open_store(ds_url)).to_pylist()
    expected = {r["image_id"]: r["has_ptx"] for r in rows}
    env = {**os.environ, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    for reader in ("pandas", "polars"):
        assert _run(READERS[reader], f"{ds_url}/manifest", env=env) == sorted(
            map(list, expected.items())
        )
