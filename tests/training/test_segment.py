"""``train_segment`` end to end on CPU: it learns, it resumes, it pins its rows, it refuses to
resume with other settings, and it runs on two gloo ranks."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ranks_helper import run_ranks

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import manifest
from pneumo.shards.errors import ConfigError
from pneumo.synthetic.archives import write_siim_demo
from pneumo.training.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
)
from pneumo.training.data import select
from pneumo.training.runs import RunDir
from pneumo.training.segment import SegmentConfig, SegmentTask, lr_factor, train_segment


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> str:
    """120 synthetic SIIM images (half positive) ingested with a 60/20/20 split."""
    root = tmp_path_factory.mktemp("demo")
    src = write_siim_demo(root / "src", n=120, size=128, seed=0)
    out = str(root / "dataset")
    batch = BatchConfig(out=out, split_fractions=(0.6, 0.2, 0.2))
    ingest_siim(SiimConfig(dicom_root=str(src.image_root), labels=src.labels_csv, batch=batch))
    return out


def small(dataset: str, out: Path | str, **changes: Any) -> SegmentConfig:
    """A run that takes seconds on CPU: 64 px, ResNet-18, 2 epochs of 4 steps."""
    base: dict[str, Any] = dict(
        dataset=dataset,
        out=str(out),
        size=64,
        batch_size=4,
        epochs=2,
        steps_per_epoch=4,
        workers=0,
        warmup_steps=2,
        lr=1e-3,
        encoder="resnet18",
        pos_rate=None,
        checkpoint_every=3,
    )
    return SegmentConfig(**{**base, **changes})


def metrics(run: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(demo: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted small run, the yardstick of the resume and pinning tests."""
    cfg = small(demo, tmp_path_factory.mktemp("reference") / "run")
    return {"cfg": cfg, "result": train_segment(cfg), "metrics": metrics(cfg.out)}


@pytest.mark.slow
def test_a_short_run_learns_more_than_predicting_nothing(demo: str, tmp_path: Path) -> None:
    # ResNet-34, the report's model, with the default pos_rate 0.8 -> 0.4.
    cfg = SegmentConfig(
        dataset=demo,
        out=str(tmp_path / "run"),
        size=64,
        batch_size=8,
        epochs=4,
        steps_per_epoch=15,
        workers=0,
        warmup_steps=5,
        lr=1e-3,
        checkpoint_every=100,
    )
    reports: list[dict[str, Any]] = []
    result = train_segment(cfg, progress=reports.append)

    rows = metrics(cfg.out)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert all(r["batches_per_rank"] == [15] for r in rows)
    val = select(demo, cfg.val_where)
    healthy = 1 - sum(val["has_ptx"].to_pylist()) / val.num_rows
    assert rows[-1]["val_empty_dice"] == pytest.approx(healthy)  # the all-empty baseline
    assert rows[-1]["val_n_images"] == val.num_rows
    best = max(r["val_dice"] for r in rows)
    assert best > healthy + 0.1, (best, healthy)
    assert result["best_val_dice"] == best and result["step"] == 60

    post = json.loads((tmp_path / "run" / "postprocess.json").read_text())
    # Chosen and scored at full resolution (not comparable to the training-size val_dice
    # above): still better than predicting nothing on the same images.
    assert post["val_dice"] > healthy, (post, healthy)
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["total_steps"] == 60 and config["init"] == [{"source": "random", "seed": 0}]
    steps = [r for r in reports if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert steps[-1]["total"] == 60 and steps[-1]["epochs"] == 4
    drawn = {key for panel in SegmentTask.panels for key, _ in panel.lines}
    assert drawn | set(SegmentTask.headline) <= set(rows[-1])  # curves name real fields
    epochs = [r for r in reports if r["event"] == "epoch"]
    assert [r["val_dice"] for r in epochs] == [r["val_dice"] for r in rows]

    last = load_checkpoint(cfg.out, "last")
    assert last["fingerprints"]["train"] == manifest.fingerprint(select(demo, cfg.where))
    assert last["fingerprints"]["val"] == manifest.fingerprint(val)
    assert last["config"] == cfg.to_dict() and last["step"] == 60 and last["epoch"] == 4
    assert last["task"] == "segment" and last["best_metric"] == "val_dice"
    # A finished run cannot go on (--epochs is fixed): its last.pt is the weights alone.
    assert not {"optimizer", "scheduler", "rng"} & set(last)
    best_ckpt = load_checkpoint(cfg.out, "best")
    assert "optimizer" not in best_ckpt and best_ckpt["val"]["val_dice"] == best
    assert model_from_checkpoint(best_ckpt)(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


class Crash(Exception):
    pass


def crash_at(step: int):
    def progress(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == step:
            raise Crash

    return progress


@pytest.mark.slow
def test_resume_auto_continues_where_the_run_stopped(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    broken = replace(reference["cfg"], out=str(tmp_path / "broken"))
    with pytest.raises(Crash):  # last.pt was written at step 6 (checkpoint_every=3)
        train_segment(broken, progress=crash_at(7))
    before = metrics(broken.out)
    assert [r["epoch"] for r in before] == [0]
    assert load_checkpoint(broken.out, "last")["step"] == 6

    result = train_segment(broken)  # the same call: resume="auto" finds last.pt
    assert result["step"] == reference["result"]["step"] == 8
    rows, whole = metrics(broken.out), reference["metrics"]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0] == before[0]  # the line written before the crash, kept as it was
    # Same batches, same weights: the resumed run validates exactly like the whole one.
    for key in ("val_dice", "val_loss", "val_dice_pos", "lr", "step"):
        assert rows[1][key] == pytest.approx(whole[1][key]), key
    assert result["postprocess"] == reference["result"]["postprocess"]


def _commit_batch(dataset: str, write_shards) -> None:
    """A second SIIM batch: 12 healthy train and 6 val images of a flat grey."""
    rows = [
        {
            "key": f"late{i:02d}", "image_id": f"late.{i}", "dataset": "siim",
            "split": "val" if i % 3 == 0 else "train", "has_ptx": False,
            "rows": 64, "cols": 64, "content_sha256": f"{i:064x}",
        }
        for i in range(18)
    ]  # fmt: skip
    ok, png = cv2.imencode(".png", np.full((64, 64), 90, np.uint8))
    members = {"png": png.tobytes(), "json": b"{}"}
    write_shards(
        Path(dataset), rows, lambda row: members, per_shard=8, one_shard=False, batch="late"
    )


@pytest.mark.slow
def test_a_batch_committed_during_training_changes_nothing(
    reference: dict[str, Any], demo: str, tmp_path: Path, write_shards
) -> None:
    dataset = shutil.copytree(demo, tmp_path / "dataset")
    cfg = replace(reference["cfg"], dataset=str(dataset), out=str(tmp_path / "run"))
    before = select(cfg.dataset, cfg.where)

    def commit_then_crash(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 1:
            _commit_batch(cfg.dataset, write_shards)
        if report["event"] == "step" and report["step"] == 7:
            raise Crash  # last.pt holds step 6: the rest runs as a resume, after the commit

    with pytest.raises(Crash):
        train_segment(cfg, progress=commit_then_crash)
    assert select(cfg.dataset, cfg.where).num_rows == before.num_rows + 12  # it did land
    train_segment(cfg)  # the resume reads its pinned rows back, not today's manifest
    pinned = pq.read_table(Path(cfg.out) / "rows" / "train.parquet")
    assert sorted(pinned["key"].to_pylist()) == sorted(before["key"].to_pylist())
    for row, ref in zip(metrics(cfg.out), reference["metrics"], strict=True):
        assert row["val_n_images"] == ref["val_n_images"]
        for key in ("val_loss", "val_dice"):  # train_loss: a resumed epoch's own steps only
            assert row[key] == pytest.approx(ref[key]), key


def test_best_pt_is_written_before_last_pt(
    demo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between the two writes must leave last.pt at the epoch before (the resume
    redoes the epoch and both files), never a last.pt whose best epoch has no best.pt."""
    written: list[str] = []
    put = RunDir.put

    def recording_put(self: RunDir, path: str, data: bytes) -> None:
        written.append(path)
        put(self, path, data)

    monkeypatch.setattr(RunDir, "put", recording_put)
    train_segment(small(demo, tmp_path / "run", checkpoint_every=100))
    checkpoints = [p for p in written if p.startswith("checkpoints/")]
    # Epoch 0 always improves on nothing; each epoch ends with last.pt.
    assert checkpoints[:2] == [BEST, LAST] and checkpoints[-1] == LAST
    assert all(checkpoints[i + 1] == LAST for i, p in enumerate(checkpoints) if p == BEST)


def test_resume_modes_and_refusals(demo: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="last.pt"):
        train_segment(small(demo, tmp_path / "empty", resume="always"))
    cfg = small(demo, tmp_path / "run", epochs=1, steps_per_epoch=1)
    train_segment(cfg)
    other = tmp_path / "same-rows-elsewhere"  # a real dataset, only its path differs
    shutil.copytree(demo, other)
    with pytest.raises(ConfigError, match="already holds a run.*--resume auto"):
        train_segment(replace(cfg, resume="never"))
    changes = {
        "--where": dict(where="split == 'train' and has_ptx"),
        "--seed": dict(seed=1),
        "--pos-rate": dict(pos_rate=(0.5, 0.5)),
        "--size": dict(size=96),
        "--batch-size": dict(batch_size=2),
        "--encoder": dict(encoder="resnet34"),
        "--encoder-init": dict(encoder_init=str(tmp_path / "weights.pt")),
        "--dataset": dict(dataset=str(other)),
    }
    for option, change in changes.items():
        with pytest.raises(ConfigError, match=f"cannot resume .*{option} ") as err:
            train_segment(replace(cfg, **change))
        assert "\n" not in str(err.value) and str(err.value).count("(now") == 1, option
    # Settings that change nothing computed may differ, and so may the loader workers (an
    # elastic resume: tests/training/test_elastic_resume.py).
    assert train_segment(replace(cfg, checkpoint_every=7))["step"] == 1
    assert train_segment(replace(cfg, workers=1))["step"] == 1


def test_a_relative_dataset_is_recorded_absolute(
    demo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(demo).parent)
    cfg = small("dataset", "run")
    assert cfg.dataset == demo and Path(cfg.dataset).is_absolute()
    s3 = small("s3://bucket/dataset", "run")
    assert s3.dataset == "s3://bucket/dataset"


@pytest.mark.slow
def test_a_run_in_s3_resumes_from_its_checkpoint(demo: str, s3_bucket: str) -> None:
    # MobileNet-v2: the smallest checkpoints (80 MB) to push through the S3 server.
    cfg = small(
        demo,
        f"{s3_bucket}/runs/r1",
        epochs=1,
        steps_per_epoch=2,
        checkpoint_every=1,
        encoder="mobilenet_v2",
    )
    with pytest.raises(Crash):  # after last.pt of step 1, before the epoch end
        train_segment(cfg, progress=crash_at(2))
    assert load_checkpoint(cfg.out, "last")["step"] == 1
    result = train_segment(cfg)
    assert result["step"] == 2
    assert load_checkpoint(cfg.out, "best")["step"] == 2
    bucket = s3_bucket.removeprefix("s3://")
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="runs/r1/")
    names = {o["Key"].removeprefix("runs/r1/") for o in listed["Contents"]}
    assert {"config.json", "metrics.jsonl", "curves.png", "postprocess.json"} <= names
    assert {"rows/train.parquet", "rows/val.parquet"} <= names


def test_config_is_checked_on_construction() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        small("data", "run", size=100)
    with pytest.raises(ConfigError, match="pos"):
        small("data", "run", pos_rate=(0.8, 1.5))
    with pytest.raises(ConfigError, match="batch-size"):
        small("data", "run", batch_size=0)
    with pytest.raises(ConfigError, match="dice_weight"):
        small("data", "run", focal_weight=0, dice_weight=0)
    with pytest.raises(ConfigError, match="--resume 'yes'"):
        small("data", "run", resume="yes")


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    factors = [lr_factor(s, warmup=4, total=20) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


@pytest.mark.slow
def test_two_gloo_ranks_on_one_shard_take_equal_steps(one_shard_dataset, tmp_path: Path) -> None:
    """30 labelled training images in a single shard, 2 ranks: neither may run short."""
    cfg = small(one_shard_dataset.url, tmp_path / "ddp", steps_per_epoch=None)
    run_ranks(train_segment, cfg, world_size=2)

    rows = metrics(cfg.out)
    labelled_train = len(one_shard_dataset.keys("train"))
    steps = labelled_train // (4 * 2)
    assert [r["batches_per_rank"] for r in rows] == [[steps, steps], [steps, steps]]
    assert all(r["val_n_images"] == len(one_shard_dataset.keys("val")) for r in rows)
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["world_size"] == 2 and config["steps_per_epoch"] == steps
    assert load_checkpoint(cfg.out, "last")["step"] == 2 * steps
    assert (tmp_path / "ddp" / "postprocess.json").exists()
