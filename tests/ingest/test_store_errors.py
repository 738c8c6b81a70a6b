"""A store that fails to give a source file is never bad data: the batch stops in one line,
nothing is quarantined, and the same command run again completes it, every image once.
Only bad content (not a DICOM, a PNG whose header cannot be read) is quarantined."""

from __future__ import annotations

import errno
import shutil
import struct
import zlib
from pathlib import Path

import boto3
import pytest
from faults import FaultProxy

import pneumo.ingest.siim
from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.nih import NihConfig, ingest_nih
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import manifest
from pneumo.shards.errors import StoreError
from pneumo.shards.store import Store, open_store


@pytest.fixture
def dicoms(shared_data: Path, tmp_path: Path) -> Path:
    """The 10 real SIIM sample DICOMs, in the download's folder layout."""
    folder = tmp_path / "in" / "study" / "series"
    folder.mkdir(parents=True)
    for dcm in sorted((shared_data / "siim" / "sample_images").glob("*.dcm")):
        shutil.copy(dcm, folder / dcm.name)
    return tmp_path / "in"


def _labels(shared_data: Path) -> Path:
    return shared_data / "siim" / "sample_images" / "train-rle-sample.csv"  # their 10 rows


def _image_ids(store: Store) -> list[str]:
    return manifest.read(store).column("image_id").to_pylist()


def _quarantined(store: Store) -> int:
    return manifest.read(store, table="quarantine").num_rows


def _fail_reading(monkeypatch: pytest.MonkeyPatch, name: str, error: OSError) -> None:
    """Reading the file called ``name`` raises ``error`` (in forked workers too)."""
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == name:
            raise error
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_read_error_stops_the_batch_and_a_rerun_completes_it(
    dicoms, shared_data, tmp_path, monkeypatch, workers
):
    victim = sorted(dicoms.rglob("*.dcm"))[6]  # in the 4th of 5 units: some are done
    _fail_reading(monkeypatch, victim.name, OSError(errno.EIO, "Input/output error"))
    out = tmp_path / "ds"
    cfg = SiimConfig(
        dicom_root=str(dicoms),
        labels=_labels(shared_data),
        batch=BatchConfig(out=str(out), workers=workers, shard_max_samples=2),
    )
    with pytest.raises(StoreError) as err:
        ingest_siim(cfg)
    line = str(err.value)
    assert "\n" not in line and victim.name in line and "Input/output error" in line
    assert "run the same command again" in line
    store = open_store(out)
    assert _image_ids(store) == [] and _quarantined(store) == 0
    monkeypatch.undo()  # the disk is back
    summary = ingest_siim(cfg)
    ids = _image_ids(store)
    assert summary.committed and summary.quarantined == 0 == _quarantined(store)
    assert len(ids) == len(set(ids)) == 10


def test_a_listed_file_that_is_gone_stops_the_batch(dicoms, shared_data, tmp_path, monkeypatch):
    """Deleted during the ingest: the batch (named by its listing) no longer matches what is
    there. It stops rather than commit a quarantine row for a file that has no content."""
    victim = sorted(dicoms.rglob("*.dcm"))[3]
    real_list = pneumo.ingest.siim.list_sources

    def list_then_delete(*args, **kwargs):
        files = real_list(*args, **kwargs)
        victim.unlink()
        return files

    monkeypatch.setattr(pneumo.ingest.siim, "list_sources", list_then_delete)
    out = tmp_path / "ds"
    cfg = SiimConfig(dicom_root=str(dicoms), labels=None, batch=BatchConfig(out=str(out)))
    with pytest.raises(StoreError, match=f"{victim.name} was listed but is gone"):
        ingest_siim(cfg)
    store = open_store(out)
    assert _image_ids(store) == [] and _quarantined(store) == 0
    monkeypatch.undo()
    ingest_siim(cfg)  # what is there now: 9 files
    ids = _image_ids(store)
    assert len(ids) == len(set(ids)) == 9 and victim.stem not in ids
    assert _quarantined(store) == 0


def _png_with_bad_header() -> bytes:
    """PNG signature and IEND, but an IHDR Pillow refuses (a zero width)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 0, 16, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 17))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def test_nih_read_errors_stop_but_bad_pngs_are_quarantined(linked, tmp_path, monkeypatch):
    from pneumo.ingest.labels import read_nih_entries

    root = tmp_path / "nih"
    shutil.copytree(linked.nih_dir, root)
    entries, _ = read_nih_entries(linked.data_entry)
    broken = next(n for n in sorted(entries) if n not in linked.nih_images)
    (root / "images" / broken).write_bytes(_png_with_bad_header())
    victim = linked.nih_images[2]
    _fail_reading(monkeypatch, victim, PermissionError(errno.EACCES, "Permission denied"))
    out = tmp_path / "ds"
    cfg = NihConfig(image_root=str(root), labels=linked.data_entry, batch=BatchConfig(out=str(out)))
    with pytest.raises(StoreError, match=f"{victim}: Permission denied"):
        ingest_nih(cfg)
    store = open_store(out)
    assert _image_ids(store) == [] and _quarantined(store) == 0
    monkeypatch.undo()
    summary = ingest_nih(cfg)
    ids = _image_ids(store)
    assert len(ids) == len(set(ids)) == len(linked.nih_images)
    rows = manifest.read(store, table="quarantine").to_pylist()
    assert summary.quarantined == 1 and rows[0]["source"].endswith(broken)
    assert "PNG header" in rows[0]["reason"]


@pytest.mark.integration
def test_expired_credentials_mid_ingest_fail_the_cli_in_one_line_and_a_rerun_completes(
    dicoms, shared_data, s3_endpoint, s3_bucket, tmp_path, monkeypatch, pneumo
):
    """An S3 archive behind a proxy whose token expires after 4 object reads."""
    if not s3_endpoint.startswith("http://"):
        pytest.skip("the fault proxy speaks plain HTTP")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    for dcm in sorted(dicoms.rglob("*.dcm")):
        client.upload_file(str(dcm), bucket, f"src/{dcm.relative_to(dicoms).as_posix()}")
    out = tmp_path / "ds"
    args = ["ingest", "siim", f"{s3_bucket}/src", "--labels", str(_labels(shared_data))]
    args += ["--out", str(out), "--shard-size", "2", "--workers", "2"]
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the pneumo process's endpoint
        proxy.add("expired", kinds={"get"}, key_contains="src/", after=4)
        failed = pneumo(*args, check=False)
        assert failed.returncode == 1, failed.stderr
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr
        assert "ExpiredToken" in errors[0] and f"s3://{bucket}/src/" in errors[0]
        assert "run the same command again" in errors[0]
        assert proxy.count("get", "expired") >= 1
        store = open_store(out)
        assert _image_ids(store) == [] and _quarantined(store) == 0
        proxy.clear()  # renewed credentials
        pneumo(*args)
    ids = _image_ids(store)
    assert len(ids) == len(set(ids)) == 10 and _quarantined(store) == 0
