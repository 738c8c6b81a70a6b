"""The real ``pneumo`` commands on real files, locally and through a loopback S3 server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_dataset(shared_data: Path, tmp_path_factory, pneumo) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ds"
    siim = shared_data / "siim"
    proc = pneumo(
        "ingest",
        "siim",
        str(siim / "sample_images"),
        "--labels",
        str(siim / "sample_images" / "train-rle-sample.csv"),
        "--out",
        str(out),
        "--workers",
        "2",
    )
    assert "ingested 10" in proc.stdout
    return out


def test_manifest_formats(local_dataset, pneumo):
    text = pneumo(
        "manifest",
        str(local_dataset),
        "--where",
        "has_ptx",
        "--columns",
        "image_id,has_ptx,mask_area_px",
    ).stdout
    assert "(5 rows)" in text
    rows = [
        json.loads(x)
        for x in pneumo("manifest", str(local_dataset), "--format", "json").stdout.splitlines()
    ]
    assert len(rows) == 10 and all("." not in r["key"] for r in rows)
    csv = pacsv.read_csv(
        io.BytesIO(
            pneumo(
                "manifest", str(local_dataset), "--format", "csv", "--where", "not has_ptx"
            ).stdout.encode()
        )
    )
    assert csv.num_rows == 5
    out = local_dataset.parent / "m.parquet"
    pneumo(
        "manifest",
        str(local_dataset),
        "--format",
        "parquet",
        "--output",
        str(out),
        "--where",
        "'Pneumothorax' in findings",
    )
    assert pq.read_table(out).num_rows == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--where", "nope == 1"], "unknown column 'nope'"),
        (["--where", "split = 'train'"], "not a valid expression"),
        (["--where", "__import__('os')"], "unsupported syntax"),
        (["--table", "other"], "expected samples or quarantine"),
        (["--where", "age_years > '30'"], "column 'age_years' holds numbers (float)"),
        (["--where", "has_ptx == 'yes'"], "column 'has_ptx' holds true/false (bool)"),
        (["--where", "split in ['val', 1]"], "column 'split' holds text (string)"),
        (["--where", "2 in findings"], "'findings' is a list of text, but 2 is not text"),
    ],
)
def test_bad_queries_fail_with_one_line(local_dataset, args, message, pneumo):
    proc = pneumo("manifest", str(local_dataset), *args, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "command", [["manifest", "{dir}"], ["train", "segment", "{dir}", "--out", "{dir}/run"]]
)
def test_a_folder_that_is_not_a_dataset_is_refused(tmp_path, command, pneumo):
    (tmp_path / "notes.txt").write_text("not a dataset\n")
    proc = pneumo(*(arg.format(dir=tmp_path) for arg in command), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: {tmp_path} is not a pneumo dataset (no _pneumo.json, no manifest/): "
        "give the --out folder or s3:// prefix of `pneumo ingest`"
    )
    assert not (tmp_path / "run").exists()


def test_unusable_inputs_fail_with_one_line(tmp_path, s3_endpoint, pneumo):
    proc = pneumo(
        "ingest", "siim", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), check=False
    )
    assert proc.returncode == 1 and "is not a folder" in proc.stderr
    proc = pneumo("manifest", "s3://no-such-bucket-here/ds", check=False)
    assert proc.returncode == 1 and "no-such-bucket-here" in proc.stderr
    assert "Traceback" not in proc.stderr and "testing" not in proc.stderr  # no credentials


def test_s3_ingest_from_s3_and_plain_pyarrow_query(shared_data, s3_bucket, s3_endpoint, pneumo):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    for p in sorted((shared_data / "siim" / "stage2_test").glob("*.dcm"))[:4]:
        s3.upload_file(str(p), bucket, f"incoming/a/b/{p.name}")
    for p in sorted((shared_data / "siim" / "sample_images").glob("*.dcm")):
        s3.upload_file(str(p), bucket, f"incoming/{p.name}")
    labels = shared_data / "siim" / "siim-pneumothorax-train-rle.csv.gz"
    proc = pneumo(
        "ingest",
        "siim",
        f"{s3_bucket}/incoming",
        "--labels",
        str(labels),
        "--out",
        f"{s3_bucket}/datasets/siim",
        "--workers",
        "2",
        "--shard-size",
        "3",
    )
    assert "ingested 14" in proc.stdout
    again = pneumo(
        "ingest",
        "siim",
        f"{s3_bucket}/incoming",
        "--labels",
        str(labels),
        "--out",
        f"{s3_bucket}/datasets/siim",
        "--shard-size",
        "3",
    )
    assert "already committed" in again.stdout
    # The README's pyarrow example, as a user would run it against MinIO.
    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint,
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        scheme="http",
    )
    table = ds.dataset(
        f"{bucket}/datasets/siim/manifest", filesystem=fs, format="parquet", partitioning="hive"
    ).to_table(filter=ds.field("has_ptx") == True)  # noqa: E712
    assert table.num_rows == 5
    assert (
        pneumo("manifest", f"{s3_bucket}/datasets/siim", "--where", "has_ptx is None")
        .stdout.strip()
        .endswith("(4 rows)")
    )
