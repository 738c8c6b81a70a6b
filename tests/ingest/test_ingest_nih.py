"""The NIH ingest run on the real PNGs and label tables."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.nih import NihConfig, ingest_nih
from pneumo.shards import manifest
from pneumo.shards.store import open_store


def _cfg(shared: Path, root: Path, out: Path, **kw) -> NihConfig:
    nih = shared / "nih"
    return NihConfig(
        image_root=str(root),
        labels=nih / "Data_Entry_2017.csv.gz",
        batch=BatchConfig(out=str(out)),
        **kw,
    )


def test_real_pngs_with_official_splits_and_boxes(shared_data, tmp_path):
    nih = shared_data / "nih"
    root = tmp_path / "images_001" / "images"  # the download's folder depth
    root.mkdir(parents=True)
    for p in (nih / "images").glob("*.png"):
        shutil.copy(p, root / p.name)
    summary = ingest_nih(
        _cfg(
            shared_data,
            tmp_path,
            tmp_path / "ds",
            bbox=nih / "BBox_List_2017.csv",
            train_val_list=nih / "train_val_list.txt",
            test_list=nih / "test_list.txt",
        )
    )
    assert summary.ingested == 3 and summary.quarantined == 0
    rows = {r["image_id"]: r for r in manifest.read(open_store(tmp_path / "ds")).to_pylist()}
    test_names = set((nih / "test_list.txt").read_text().split())
    for name, row in rows.items():
        assert (row["split"] == "test") == (name in test_names)
        assert row["rows"] == row["cols"] == 1024 and row["bit_depth"] == 8
        assert row["has_ptx"] == ("Pneumothorax" in row["findings"])
        assert row["patient_key"] and name[:8] not in row["patient_key"]
    assert rows["00000001_000.png"]["findings"] == ["Cardiomegaly"]
    assert rows["00000001_000.png"]["age_years"] == 58 and rows["00000001_000.png"]["sex"] == "M"
    # the PNG is stored exactly as it came
    tar = next((tmp_path / "ds").glob("shards/**/*.tar"))
    with tarfile.open(tar) as tf:
        names = tf.getnames()
        key = names[0].split(".")[0]
        stored = tf.extractfile(f"{key}.png").read()
        meta = json.loads(tf.extractfile(f"{key}.json").read())
    assert stored == (nih / "images" / f"{key}.png").read_bytes()
    assert meta["findings"] == rows[f"{key}.png"]["findings"]


def test_a_patient_keeps_one_split_across_batches(shared_data, tmp_path):
    nih = shared_data / "nih"
    out = tmp_path / "ds"
    ingest_nih(
        _cfg(
            shared_data,
            nih / "images",
            out,
            train_val_list=nih / "train_val_list.txt",
            test_list=nih / "test_list.txt",
        )
    )
    ingest_nih(_cfg(shared_data, nih / "images_downscaled", out))  # no lists this time
    rows = manifest.read(open_store(out)).to_pylist()
    by_patient: dict[str, set[str]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_key"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    assert any(len([r for r in rows if r["patient_key"] == p]) > 1 for p in by_patient)
    # 00000001_000 is in both folders: stored once
    assert [r["image_id"] for r in rows].count("00000001_000.png") == 1


def test_odd_pngs_are_converted_or_quarantined(shared_data, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    grey = np.array(Image.open(shared_data / "nih" / "images" / "00000002_000.png"))
    rgba = np.stack([grey, grey // 2, grey // 3, np.full_like(grey, 255)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(root / "00000002_000.png")
    (root / "00000013_003.png").write_bytes(
        (shared_data / "nih" / "images" / "00000013_003.png").read_bytes()[:5000]
    )
    shutil.copy(shared_data / "nih" / "images" / "00000001_000.png", root / "99999999_000.png")
    (root / "notes.png").write_bytes(b"hello")
    out = tmp_path / "ds"
    summary = ingest_nih(_cfg(shared_data, root, out))
    store = open_store(out)
    assert summary.ingested == 1
    q = {
        Path(r["source"]).name: r["reason"]
        for r in manifest.read(store, table="quarantine").to_pylist()
    }
    assert "truncated" in q["00000013_003.png"]
    assert "no row" in q["99999999_000.png"]
    assert "index" in q["notes.png"]
    tar = next(out.glob("shards/**/*.tar"))
    with tarfile.open(tar) as tf:
        png = tf.extractfile("00000002_000.png").read()
    back = np.array(Image.open(io.BytesIO(png)))
    assert back.ndim == 2 and (back == grey).all()  # the first channel, losslessly
