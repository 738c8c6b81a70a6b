"""``evaluate_segment`` on a trained run: the summary, the per-image table, consistency."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from pneumo.evaluation.evaluate import EvaluateConfig, evaluate_segment
from pneumo.shards.errors import ConfigError
from pneumo.training.checkpoint import CheckpointError, load_checkpoint, to_bytes
from pneumo.training.data import select


def test_summary_and_per_image_results(trained_run) -> None:
    summary = evaluate_segment(EvaluateConfig(run=trained_run.run, split="test", workers=0))

    # What `pneumo evaluate --format json` prints: the summary, JSON-clean.
    printed = json.loads(json.dumps(summary, allow_nan=False))
    assert {
        "dice",
        "dice_pos",
        "n_images",
        "n_positive",
        "accuracy",
        "sensitivity",
        "specificity",
        "empty_baseline_dice",
        "dice_neg",
        "postprocess",
        "checkpoint",
    } <= set(printed)
    rows = select(trained_run.dataset, "split == 'test'")
    assert summary["n_images"] == rows.num_rows
    labels = rows["has_ptx"].to_pylist()
    assert summary["n_positive"] == sum(labels)
    # Predicting nothing scores 1 on each healthy image and 0 on each other one.
    assert summary["empty_baseline_dice"] == pytest.approx(labels.count(False) / len(labels))
    assert summary["resolution"] == "full"

    table = pq.read_table(Path(trained_run.run) / "eval" / "test.parquet")
    assert table.column_names == [
        "image_id",
        "key",
        "has_ptx",
        "pred_positive",
        "dice",
        "pred_area",
        "true_area",
        "max_prob",
    ]
    assert sorted(table["key"].to_pylist()) == sorted(rows["key"].to_pylist())
    dice = table["dice"].to_numpy()
    assert summary["dice"] == pytest.approx(dice.mean())
    positive = table["true_area"].to_numpy() > 0
    if positive.any():
        assert summary["dice_pos"] == pytest.approx(dice[positive].mean())
    called = table["pred_positive"].to_numpy(zero_copy_only=False)
    label = table["has_ptx"].to_numpy(zero_copy_only=False)
    assert summary["accuracy"] == pytest.approx(np.mean(called == label))
    # An empty prediction scores 1 exactly on healthy images and 0 on the others.
    empty = table["pred_area"].to_numpy() == 0
    assert np.all(dice[empty] == (~positive[empty]).astype(float))
    stored = json.loads((Path(trained_run.run) / "eval" / "test.json").read_text())
    assert stored["dice"] == summary["dice"] and stored["config"]["split"] == "test"


def test_val_score_matches_what_training_chose(trained_run) -> None:
    """The same weights, triplet, TTA setting, images and resolution as the search at the
    end of training: the same Dice, for the chosen triplet and for each TTA setting."""
    post = json.loads((Path(trained_run.run) / "postprocess.json").read_text())
    summary = evaluate_segment(EvaluateConfig(run=trained_run.run, split="val", workers=0))
    assert summary["dice"] == pytest.approx(post["val_dice"], abs=1e-6)
    assert summary["tta"] == post["tta"] and summary["postprocess"]["min_area"] == post["min_area"]

    searched = json.loads((Path(trained_run.run) / "postprocess_search.json").read_text())
    assert sorted(entry["tta"] for entry in searched["by_tta"]) == [False, True]
    assert max(entry["val_dice"] for entry in searched["by_tta"]) == post["val_dice"]
    max_probs = {}
    for entry in searched["by_tta"]:
        result = evaluate_segment(
            EvaluateConfig(run=trained_run.run, split="val", workers=0, tta=entry["tta"])
        )
        assert result["tta"] is entry["tta"]
        assert result["dice"] == pytest.approx(entry["val_dice"], abs=1e-6), entry
        for key in ("top_threshold", "min_area", "mask_threshold"):
            assert result["postprocess"][key] == entry[key]
        table = pq.read_table(Path(trained_run.run) / "eval" / "val.parquet")
        max_probs[entry["tta"]] = table["max_prob"].to_numpy()
    # Flip TTA reached the model: it changed the probabilities of this asymmetric data.
    assert np.abs(max_probs[True] - max_probs[False]).max() > 1e-4


def test_a_run_searched_without_tta_refuses_tta(trained_run, tmp_path: Path) -> None:
    """A run from before both settings were searched: --tta has no triplet to apply."""
    run = tmp_path / "run"
    shutil.copytree(trained_run.run, run)
    (run / "postprocess_search.json").unlink()
    post = {"top_threshold": 0.6, "min_area": 0, "mask_threshold": 0.4}  # no "tta": searched off
    (run / "postprocess.json").write_text(json.dumps(post))
    with pytest.raises(ConfigError, match="without --tta"):
        evaluate_segment(EvaluateConfig(run=str(run), split="val", workers=0, tta=True))
    summary = evaluate_segment(EvaluateConfig(run=str(run), split="val", workers=0))
    assert summary["tta"] is False and summary["postprocess"]["mask_threshold"] == 0.4


def test_last_checkpoint(trained_run) -> None:
    last = evaluate_segment(
        EvaluateConfig(run=trained_run.run, split="val", workers=0, checkpoint="last")
    )
    assert last["checkpoint"] == "last" and last["step"] == trained_run.config.epochs * 8


def test_a_moved_dataset_is_named_with_dataset(trained_run, tmp_path: Path, pneumo) -> None:
    """The run's checkpoint names a dataset that is gone; ``--dataset`` points elsewhere."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(Path(trained_run.run) / "postprocess.json", run)
    ckpt = load_checkpoint(trained_run.run, "best")
    ckpt["config"]["dataset"] = str(tmp_path / "gone")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.pt").write_bytes(to_bytes(ckpt))
    moved = tmp_path / "elsewhere"
    shutil.copytree(trained_run.dataset, moved)

    args = ["evaluate", "segment", str(run), "--split", "val", "--format", "json", "--workers", "0"]
    gone = pneumo(*args, check=False)
    assert gone.returncode == 1 and "gone" in gone.stderr
    summary = json.loads(pneumo(*args, "--dataset", str(moved)).stdout)
    reference = evaluate_segment(EvaluateConfig(run=trained_run.run, split="val", workers=0))
    assert summary["dataset"] == str(moved) and summary["dice"] == reference["dice"]
    clash = pneumo(*args, trained_run.dataset, "--dataset", str(moved), check=False)
    assert clash.returncode == 1 and "differ" in clash.stderr


def test_a_run_in_s3(trained_run, s3_bucket: str) -> None:
    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for name in ("checkpoints/best.pt", "postprocess.json"):
        s3.upload_file(str(Path(trained_run.run) / name), bucket, f"runs/r1/{name}")
    local = evaluate_segment(EvaluateConfig(run=trained_run.run, split="val", workers=0))
    remote = evaluate_segment(
        EvaluateConfig(
            run=f"{s3_bucket}/runs/r1", dataset=trained_run.dataset, split="val", workers=0
        )
    )
    assert remote["dice"] == local["dice"]
    body = s3.get_object(Bucket=bucket, Key="runs/r1/eval/val.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(body)).num_rows == remote["n_images"]


def test_a_run_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="best.pt"):
        evaluate_segment(EvaluateConfig(run=str(tmp_path), split="test", workers=0))
