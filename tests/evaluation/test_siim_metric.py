"""The SIIM metric exactly: ``pneumo evaluate`` against an independent scorer of
``pneumo predict``'s CSV, both at the images' full resolution.

The independent scorer below decodes the RLE itself (not with ``pneumo.ingest.rle``), ORs the
instance rows of the ground truth, and takes the competition's mean of per-image Dice.
The demo images are 128 px and the run's model works at 64 px, so a score taken at the
model's size (the bug this guards against) counts 4x fewer pixels per image.
"""

from __future__ import annotations

import csv
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from pneumo.evaluation.evaluate import EvaluateConfig, evaluate_segment
from pneumo.shards.errors import IntegrityError
from pneumo.shards.store import open_store
from pneumo.training.data import select
from pneumo.training.fullres import FullResMasks, MaskError


def decode_rle(rle: str, rows: int, cols: int) -> np.ndarray:
    """SIIM RLE: relative ``gap length`` pairs over the column-major flattened image."""
    flat = np.zeros(rows * cols, bool)
    values = [int(v) for v in rle.split()]
    pos = 0
    for gap, length in zip(values[0::2], values[1::2], strict=True):
        pos += gap
        flat[pos : pos + length] = True
        pos += length
    return flat.reshape(cols, rows).T


def read_rle_csv(path: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """ImageId -> mask, the rows of one image OR-ed ("-1": empty); BOM and spaces tolerated."""
    masks: dict[str, np.ndarray] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader)  # header
        for image_id, rle in reader:
            image_id, rle = image_id.strip(), rle.strip()
            mask = masks.setdefault(image_id, np.zeros(sizes[image_id], bool))
            if rle != "-1":
                mask |= decode_rle(rle, *sizes[image_id])
    return masks


def siim_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def dicom_sizes(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = (int(ds.Rows), int(ds.Columns))
    return out


@pytest.fixture(scope="module")
def mixed_run(trained_run, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The trained run with a TTA triplet that calls about half the test images positive.

    The weak model puts large partial masks everywhere; the top threshold is the median of
    the test images' highest probabilities, so some images are called and some not, and a
    small ``min_area`` (100 px of 1024x1024, 1.6 px at 128) is part of the decision.
    """
    run = tmp_path_factory.mktemp("mixed") / "run"
    shutil.copytree(trained_run.run, run)
    (run / "postprocess_search.json").unlink()
    plain = {"top_threshold": 0.5, "min_area": 0, "mask_threshold": 0.5, "tta": True}
    (run / "postprocess.json").write_text(json.dumps(plain))
    evaluate_segment(EvaluateConfig(run=str(run), split="test", workers=0))
    top = float(np.median(pq.read_table(run / "eval" / "test.parquet")["max_prob"].to_numpy()))
    post = {"top_threshold": top, "min_area": 100, "mask_threshold": 0.5, "tta": True}
    (run / "postprocess.json").write_text(json.dumps(post))
    shutil.rmtree(run / "eval")
    return str(run)


def test_evaluate_agrees_with_an_independent_scorer_of_predict(
    trained_run, mixed_run: str, tmp_path: Path, pneumo
) -> None:
    summary = json.loads(
        pneumo(
            "evaluate", "segment", mixed_run, trained_run.dataset,
            "--split", "test", "--format", "json", "--workers", "0",
        ).stdout
    )  # fmt: skip
    test_ids = set(select(trained_run.dataset, "split == 'test'")["image_id"].to_pylist())
    submission = tmp_path / "submission.csv"
    pneumo("predict", mixed_run, str(trained_run.dicoms), "--out", str(submission))

    sizes = dicom_sizes(trained_run.dicoms)
    truth = read_rle_csv(trained_run.labels, sizes)
    pred = read_rle_csv(submission, sizes)
    assert test_ids <= set(pred) and test_ids <= set(truth)
    ids = sorted(test_ids)
    independent = [siim_dice(pred[i], truth[i]) for i in ids]

    assert summary["n_images"] == len(ids) and summary["tta"] is True
    assert summary["dice"] == pytest.approx(np.mean(independent), abs=0.002)
    called = sum(bool(pred[i].any()) for i in ids)
    assert 0 < called < len(ids)  # the triplet both called and dropped images

    # Image by image, in full-resolution pixels (the model's size would count 4x fewer).
    table = pq.read_table(Path(mixed_run) / "eval" / "test.parquet")
    rows = {r["image_id"]: r for r in table.to_pylist()}
    for i, dice in zip(ids, independent, strict=True):
        assert rows[i]["true_area"] == int(truth[i].sum()), i
        assert rows[i]["pred_area"] == pytest.approx(int(pred[i].sum()), abs=2), i
        assert rows[i]["dice"] == pytest.approx(dice, abs=0.002), i
    healthy = [i for i in ids if not truth[i].any()]
    assert summary["empty_baseline_dice"] == pytest.approx(len(healthy) / len(ids))


def test_full_resolution_masks_are_the_stored_ground_truth(trained_run) -> None:
    rows = select(trained_run.dataset, "split == 'val'")
    masks = FullResMasks(trained_run.dataset, rows)
    sizes = dicom_sizes(trained_run.dicoms)
    truth = read_rle_csv(trained_run.labels, sizes)
    by_id = dict(zip(rows["image_id"].to_pylist(), rows["key"].to_pylist(), strict=True))
    positives = 0
    for image_id, key in by_id.items():
        got = masks.get(key, sizes[image_id])
        assert got.dtype == bool and np.array_equal(got, truth[image_id]), image_id
        positives += bool(got.any())
    assert positives >= 3
    key = select(trained_run.dataset, "split == 'val' and has_ptx")["key"][0].as_py()
    with pytest.raises(MaskError, match="mask is"):
        masks.get(key, (64, 64))  # the image is 128 px: a mask of another size is refused
    with pytest.raises(MaskError, match="not among"):
        masks.get("no-such-key", (128, 128))


def test_a_positive_without_its_mask_is_a_clear_error(trained_run, tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    shutil.copytree(trained_run.dataset, dataset)
    rows = select(str(dataset), "split == 'val' and has_ptx")
    shard = rows["shard"][0].as_py()
    store = open_store(str(dataset))
    src = store.local_path(shard)
    stripped = tmp_path / "stripped.tar"
    with tarfile.open(src) as tin, tarfile.open(stripped, "w") as tout:
        for member in tin.getmembers():
            if not member.name.endswith(".mask.png"):
                tout.addfile(member, tin.extractfile(member))
    shutil.move(stripped, src)
    masks = FullResMasks(str(dataset), rows)
    key = rows["key"][0].as_py()
    # The stream's check sees the sample fill less than its recorded size (the mask gone)
    # before the mask reader would: either way one error naming the sample.
    with pytest.raises((MaskError, IntegrityError), match=f"{key}.*(incomplete|no mask.png)"):
        masks.get(key, (128, 128))
