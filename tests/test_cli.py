"""The real ``pneumo`` commands on real files, locally and through a loopback S3 server."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

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
    absent = f"pneumo-test-absent-{uuid.uuid4().hex[:8]}"
    proc = pneumo("manifest", f"s3://{absent}/ds", check=False)
    assert proc.returncode == 1 and absent in proc.stderr and "Traceback" not in proc.stderr
    assert _credentials().secret_key not in proc.stderr  # credentials are never printed


def _credentials():
    """The credentials boto3 finds the standard way (moto's, or your MinIO's)."""
    return boto3.session.Session().get_credentials().get_frozen_credentials()


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
    # The README's pyarrow example (deltalake with pyarrow's own S3 file system), as a user
    # would run it against MinIO; filtered in memory, as the README says.
    creds = _credentials()
    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint,
        access_key=creds.access_key,
        secret_key=creds.secret_key,
        session_token=creds.token,
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        scheme="https" if s3_endpoint.startswith("https") else "http",
    )
    uri = f"{s3_bucket}/datasets/siim/manifest"
    options = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ALLOW_HTTP": "true"}
    files = pafs.SubTreeFileSystem(f"{bucket}/datasets/siim/manifest", fs)
    table = DeltaTable(uri, storage_options=options).to_pyarrow_dataset(filesystem=files).to_table()
    assert table.filter(pc.field("has_ptx") == True).num_rows == 5  # noqa: E712
    assert (
        pneumo("manifest", f"{s3_bucket}/datasets/siim", "--where", "has_ptx is None")
        .stdout.strip()
        .endswith("(4 rows)")
    )


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _ignores_sigint(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


def _ctrl_c(args: list[str], ready: Callable[[int], bool]) -> subprocess.CompletedProcess[str]:
    """Run ``pneumo ARGS`` as a terminal would (its own process group, SIGINT not ignored),
    and once ``ready(pid)`` send SIGINT to the whole group, as Ctrl-C does."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env=dict(os.environ),  # the suite's test secret (tests/conftest.py)
    )
    try:
        deadline = time.monotonic() + 600
        while not ready(proc.pid):
            assert proc.poll() is None, f"ended before Ctrl-C: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "never got ready for Ctrl-C"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_during_ingest_is_one_line_and_the_rerun_resumes(shared_data, tmp_path, workers):
    src, out = tmp_path / "in", tmp_path / "ds"
    src.mkdir()
    for p in sorted((shared_data / "siim" / "sample_images").glob("*.dcm")):
        shutil.copy(p, src / p.name)
    fifo = src / "zz-stuck.dcm"  # reading it blocks until a writer comes: a DICOM on a slow disk
    os.mkfifo(fifo)
    writers: list[int] = []

    def reading_the_fifo(pid: int) -> bool:
        if not writers:
            try:  # opens once a reader (the process decoding it) has it open
                writers.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                return False
        # Pool workers set themselves up at start: give them time to (fail to) ignore SIGINT.
        pool = _children(pid)
        settled = len(pool) >= workers - (workers == 1) and all(map(_ignores_sigint, pool))
        return settled or time.monotonic() > reading_the_fifo.since + 10  # type: ignore[attr-defined]

    reading_the_fifo.since = time.monotonic()  # type: ignore[attr-defined]
    args = ["ingest", "siim", str(src), "--out", str(out), "--shard-size", "2"]
    try:
        proc = _ctrl_c([*args, "--workers", str(workers)], reading_the_fifo)
    finally:
        for fd in writers:
            os.close(fd)
    assert proc.returncode == 130
    # One line for the interruption (the no-xref warning, printed at start, comes before it).
    assert proc.stderr.strip().splitlines()[-1] == (
        "interrupted: pneumo ingest siim stopped; run the same command again to resume it"
    )
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    # The same inputs again (an empty file where the stuck one was): the batch completes.
    fifo.unlink()
    fifo.touch()
    env = dict(os.environ)
    again = subprocess.run(
        [sys.executable, "-m", "pneumo", *args, "--workers", str(workers)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    assert "ingested 10" in again.stdout and "quarantined 1" in again.stdout


@pytest.mark.slow
def test_ctrl_c_during_training_is_one_line(shared_data, tmp_path, pneumo):
    dataset, run = tmp_path / "ds", tmp_path / "run"
    pneumo(
        "ingest",
        "siim",
        str(shared_data / "siim"),
        "--labels",
        str(shared_data / "siim" / "siim-pneumothorax-train-rle.csv.gz"),
        "--out",
        str(dataset),
        "--split-fractions",
        "0.5,0.5,0",
    )

    def loader_workers_running(pid: int) -> bool:
        return (run / "config.json").exists() and len(_children(pid)) >= 2

    proc = _ctrl_c(
        ["train", "segment", str(dataset), "--out", str(run), "--size", "64", "--epochs", "100"]
        + ["--batch-size", "2", "--workers", "2"],
        loader_workers_running,
    )
    assert proc.returncode == 130
    assert proc.stderr.strip() == (
        "interrupted: pneumo train segment stopped; run the same command again to resume it"
    )


def _command_paths(command, path: tuple[str, ...] = ()):
    yield path
    for name, child in sorted(getattr(command, "commands", {}).items()):
        yield from _command_paths(child, (*path, name))


def test_help_shows_no_value_placeholder_on_flags():
    from typer.main import get_command
    from typer.testing import CliRunner

    from pneumo.cli import app

    paths = list(_command_paths(get_command(app)))
    assert {("ingest", "siim"), ("train", "segment"), ("manifest",)} <= set(paths)
    for path in paths:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert "--help" in result.output
        # --verbose, --help, --tta... take no value: no <bool> / BOOLEAN after them.
        assert "<bool>" not in result.output and "BOOLEAN" not in result.output, path
