"""``evaluate_segment`` on a trained run: the summary, the per-image table, consistency."""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from evaluation.evaluate import EvaluateConfig, evaluate_segment
from training.checkpoint import CheckpointError
from training.data import select


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
        "empty_dice",
        "postprocess",
        "checkpoint",
    } <= set(printed)
    rows = select(trained_run.dataset, "split == 'test'")
    assert summary["n_images"] == rows.num_rows
    assert summary["n_positive"] == sum(rows["has_ptx"].to_pylist())

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
    """The same weights, triplet and images as the search at the end of training."""
    post = json.loads((Path(trained_run.run) / "postprocess.json").read_text())
    summary = evaluate_segment(EvaluateConfig(run=trained_run.run, split="val", workers=0))
    assert summary["dice"] == pytest.approx(post["val_dice"], abs=1e-6)
    assert summary["postprocess"]["min_area"] == post["min_area"]


def test_tta_and_last_checkpoint(trained_run) -> None:
    plain = evaluate_segment(EvaluateConfig(run=trained_run.run, split="val", workers=0))
    tta = evaluate_segment(
        EvaluateConfig(run=trained_run.run, split="val", workers=0, tta=True, checkpoint="last")
    )
    assert tta["tta"] is True and tta["checkpoint"] == "last"
    assert tta["n_images"] == plain["n_images"]
    assert 0.0 <= tta["dice"] <= 1.0


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
