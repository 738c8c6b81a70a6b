"""Label files are checked before anything is written; new labels supersede old ones as a
batch of their own, which can be dropped to go back."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import batches, manifest
from pneumo.shards.store import open_store


def test_an_nih_table_given_as_siim_labels_is_refused_before_anything_is_written(
    shared_data, tmp_path, pneumo
):
    out = tmp_path / "ds"
    proc = pneumo(
        "ingest",
        "siim",
        str(shared_data / "siim" / "sample_images"),
        "--labels",
        str(shared_data / "nih" / "Data_Entry_2017.csv.gz"),
        "--out",
        str(out),
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "112121 of 112121 rows" in error[0]
    assert "Data_Entry_2017.csv.gz" in error[0] and "right label file" in error[0]
    assert not out.exists() or not any(out.rglob("*.parquet")) and not any(out.rglob("*.tar"))


def test_a_label_file_whose_rows_mostly_fail_is_refused(shared_data, tmp_path):
    sample = shared_data / "siim" / "sample_images"
    rows = (sample / "train-rle-sample.csv").read_text(encoding="utf-8-sig").splitlines()
    labels = tmp_path / "labels.csv"
    bad = [f"{r.split(',')[0]},12 x 7" for r in rows[:6]]  # 6 bad RLE rows, 4 good ones
    labels.write_text("\n".join(bad + rows[6:]) + "\n")
    from pneumo.ingest.dicom import BadInput

    with pytest.raises(BadInput, match="6 of 10 rows"):
        ingest_siim(
            SiimConfig(
                dicom_root=str(sample), labels=labels, batch=BatchConfig(out=str(tmp_path / "d"))
            )
        )
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").rglob("*.tar"))


def test_a_sample_submission_given_as_labels_warns(shared_data, tmp_path, pneumo):
    stage2 = shared_data / "siim" / "stage2_test"
    proc = pneumo(
        "ingest",
        "siim",
        str(stage2),
        "--labels",
        str(stage2 / "stage_2_sample_submission.csv"),
        "--out",
        str(tmp_path / "ds"),
    )
    assert "all 3205 images are labelled -1" in proc.stderr
    assert "pneumo batch drop" in proc.stderr


def _mask(tar_path: Path, key: str) -> np.ndarray:
    with tarfile.open(tar_path) as tf:
        data = tf.extractfile(f"{key}.mask.png").read()
    return np.array(Image.open(io.BytesIO(data))) > 0


def test_new_labels_supersede_old_ones_as_a_batch_that_can_be_dropped(shared_data, tmp_path):
    sample = shared_data / "siim" / "sample_images"
    out = tmp_path / "ds"
    cfg = SiimConfig(
        dicom_root=str(sample),
        labels=sample / "train-rle-sample.csv",
        batch=BatchConfig(out=str(out)),
    )
    ingest_siim(cfg)
    store = open_store(out)
    before = {r["image_id"]: r for r in manifest.read(store).to_pylist()}
    positive = sorted(i for i, r in before.items() if r["has_ptx"])[0]
    negative = sorted(i for i, r in before.items() if not r["has_ptx"])[0]
    # Corrected labels: the positive is negative now; the negative gets the positive's mask.
    rows = (sample / "train-rle-sample.csv").read_text(encoding="utf-8-sig").splitlines()
    rle = [r.split(",", 1)[1] for r in rows if r.startswith(positive)]
    fixed = [r for r in rows if not r.startswith((positive, negative))]
    fixed += [f"{positive},-1"] + [f"{negative},{x}" for x in rle]
    labels = tmp_path / "fixed.csv"
    labels.write_text("\n".join(fixed) + "\n")

    plain = ingest_siim(SiimConfig(dicom_root=str(sample), labels=labels, batch=cfg.batch))
    assert (plain.ingested, plain.skipped, plain.label_changes) == (0, 10, 2)
    assert {r["image_id"]: r["has_ptx"] for r in manifest.read(store).to_pylist()} == {
        i: r["has_ptx"] for i, r in before.items()
    }

    batch = BatchConfig(out=str(out), relabel=True)
    summary = ingest_siim(SiimConfig(dicom_root=str(sample), labels=labels, batch=batch))
    assert (summary.ingested, summary.relabelled, summary.skipped) == (2, 2, 8)
    after = {r["image_id"]: r for r in manifest.read(store).to_pylist()}
    assert len(after) == 10 and manifest.read(store).num_rows == 10  # one row per image
    earlier = {
        r["image_id"]: r for r in manifest.read(store, version=summary.version - 1).to_pylist()
    }
    assert earlier == before  # the table's previous version still has the old labels
    assert (after[positive]["has_ptx"], after[negative]["has_ptx"]) == (False, True)
    assert after[positive]["labels_version"] == after[negative]["labels_version"] == 2
    assert after[negative]["split"] == before[negative]["split"]
    assert after[negative]["patient_key"] == before[negative]["patient_key"]
    donor = _mask(out / before[positive]["shard"], before[positive]["key"])
    assert (_mask(out / after[negative]["shard"], after[negative]["key"]) == donor).all()
    assert not _mask(out / after[positive]["shard"], after[positive]["key"]).any()
    unchanged = [i for i in after if i not in (positive, negative)]
    assert all(after[i]["batch"] == before[i]["batch"] for i in unchanged)

    batches.drop_batch(store, "siim", summary.batch)  # back to the old labels
    back = {r["image_id"]: r for r in manifest.read(store).to_pylist()}
    assert {i: (r["has_ptx"], r["labels_version"]) for i, r in back.items()} == {
        i: (r["has_ptx"], 1) for i, r in before.items()
    }
