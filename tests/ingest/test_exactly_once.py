"""Every image once, whatever the units; any image id or file name is safe."""

from __future__ import annotations

import os
import re
import shutil
import struct
import tarfile
from pathlib import Path

import pytest

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import manifest
from pneumo.shards.store import open_store

SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _with_uid(data: bytes, uid: bytes) -> bytes:
    """The DICOM with its SOPInstanceUID element's bytes replaced (any bytes, any length:
    pydicom refuses to write what a hostile file can hold)."""
    at = data.index(b"\x08\x00\x18\x00UI", 132)  # (0008,0018) UI, explicit VR little endian
    old = struct.unpack("<H", data[at + 6 : at + 8])[0]
    uid += b"\0" * (len(uid) % 2)
    return data[: at + 6] + struct.pack("<H", len(uid)) + uid + data[at + 8 + old :]


def _tar_keys(out: Path) -> list[str]:
    keys = []
    for tar in sorted(out.glob("shards/**/*.tar")):
        with tarfile.open(tar) as tf:
            keys += sorted({m.name.partition(".")[0] for m in tf.getmembers()})
    return keys


@pytest.mark.parametrize("workers", [1, 2])
def test_an_image_given_twice_is_stored_referenced_and_streamed_once(
    shared_data, tmp_path, workers
):
    sample = shared_data / "siim" / "sample_images"
    src = tmp_path / "src"
    src.mkdir()
    dicoms = sorted(sample.glob("*.dcm"))
    for p in dicoms:
        shutil.copy(p, src / p.name)
    # An id given again (with other pixels) and the same pixels under another id, in other
    # units than the originals (--shard-size 1: one file per unit).
    other = next((shared_data / "siim" / "stage2_test").glob("*.dcm")).read_bytes()
    (src / "zz-same-id.dcm").write_bytes(_with_uid(other, dicoms[0].stem.encode()))
    data = dicoms[1].read_bytes()
    (src / "zz-renamed.dcm").write_bytes(_with_uid(data, b"1.2.3.4.5.6.7"))
    out = tmp_path / "ds"
    summary = ingest_siim(
        SiimConfig(
            dicom_root=str(src),
            labels=sample / "train-rle-sample.csv",
            batch=BatchConfig(out=str(out), workers=workers, shard_max_samples=1),
        )
    )
    assert (summary.ingested, summary.duplicates, summary.skipped) == (10, 2, 0)
    rows = manifest.read(open_store(out)).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(p.stem for p in dicoms)
    first = next(r for r in rows if r["image_id"] == dicoms[0].stem)
    assert first["rows"] == 1024 and first["has_ptx"] is not None  # the first file's, labelled
    keys = _tar_keys(out)
    assert sorted(keys) == sorted(r["key"] for r in rows)  # each sample once in the shards
    assert len({r["shard"] for r in rows}) == len(rows) == 10  # one sample per shard


def test_hostile_ids_and_names_never_abort_or_escape(shared_data, tmp_path):
    stage2 = sorted((shared_data / "siim" / "stage2_test").glob("*.dcm"))
    ids = {
        "long": b"1.2." + b"9" * 112,  # the 116-character SOPInstanceUID of the issue
        "escape": b"../../escape",
        "space": b"with space",
        "latin": "unicodé-ид".encode(),
        "huge": b"x" * 200,
        "dotted": b"1.2.840.1",
        "clash": b"1_2_840_1",  # the same key as "1.2.840.1"
    }
    src = tmp_path / "src"
    src.mkdir()
    names = ["a b.dcm", "ünïcode.dcm", "n" * 200 + ".dcm", "-dash.dcm", "x.dcm", "y.dcm", "z.dcm"]
    for uid, path, name in zip(ids.values(), stage2, names, strict=False):
        (src / name).write_bytes(_with_uid(path.read_bytes(), uid))
    bad_name = os.fsencode(src) + b"/\xff\xfe-garbage.dcm"  # not UTF-8
    with open(bad_name, "wb") as f:
        f.write(b"not a dicom")
    out = tmp_path / "out" / "ds"
    before = {p for p in tmp_path.rglob("*") if "out" not in p.parts}
    summary = ingest_siim(SiimConfig(dicom_root=str(src), batch=BatchConfig(out=str(out))))
    after = {p for p in tmp_path.rglob("*") if "out" not in p.parts}
    assert after == before  # nothing written beside the dataset
    rows = manifest.read(open_store(out)).to_pylist()
    assert summary.ingested == len(rows) == 6
    stored = {r["image_id"] for r in rows}
    want = {uid.decode("latin-1") for tag, uid in ids.items() if tag != "clash"}
    assert stored == want  # the ids themselves are kept, only the keys are made safe
    assert all(SAFE_KEY.fullmatch(r["key"]) for r in rows)
    assert sorted(_tar_keys(out)) == sorted(r["key"] for r in rows)
    quarantine = manifest.read(open_store(out), table="quarantine").to_pylist()
    reasons = {q["source"]: q["reason"] for q in quarantine}
    assert any("already used by" in r and "1.2.840.1" in r for r in reasons.values())
    assert any("\\xff\\xfe-garbage.dcm" in s for s in reasons)
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
