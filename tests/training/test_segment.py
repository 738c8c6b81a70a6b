"""``train_segment`` end to end on CPU: it learns, it resumes, it runs on two gloo ranks."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
import torch.multiprocessing as mp

from ingest.batch import BatchConfig
from ingest.demo import write_siim_demo
from ingest.siim import SiimConfig, ingest_siim
from shards import manifest
from shards.errors import ConfigError
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.data import select
from training.segment import SegmentConfig, lr_factor, train_segment


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
    assert post["val_dice"] >= best - 1e-9  # the plain 0.5 threshold is in the grid
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["total_steps"] == 60
    assert [r["step"] for r in reports] == list(range(1, 61))
    assert reports[-1]["total"] == 60 and reports[-1]["images_per_s"] > 0

    last = load_checkpoint(cfg.out, "last")
    train = select(demo, cfg.where)
    assert last["manifest_fingerprint"] == manifest.fingerprint(train)
    assert last["config"] == cfg.to_dict() and last["step"] == 60 and last["epoch"] == 4
    assert {"optimizer", "scheduler", "rng"} <= set(last)
    best_ckpt = load_checkpoint(cfg.out, "best")
    assert "optimizer" not in best_ckpt and best_ckpt["val"]["val_dice"] == best
    assert model_from_checkpoint(best_ckpt)(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


class Crash(Exception):
    pass


@pytest.mark.slow
def test_resume_continues_where_the_run_stopped(demo: str, tmp_path: Path) -> None:
    whole = small(demo, tmp_path / "whole")
    expected = train_segment(whole)

    broken = replace(whole, out=str(tmp_path / "broken"))

    def crash_at_step_7(report: dict[str, Any]) -> None:
        if report["step"] == 7:  # last.pt was written at step 6 (checkpoint_every=3)
            raise Crash

    with pytest.raises(Crash):
        train_segment(broken, progress=crash_at_step_7)
    before = metrics(broken.out)
    assert [r["epoch"] for r in before] == [0]
    assert load_checkpoint(broken.out, "last")["step"] == 6

    result = train_segment(replace(broken, resume=True))
    assert result["step"] == expected["step"] == 8
    rows, reference = metrics(broken.out), metrics(whole.out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0] == before[0]  # the line written before the crash, kept as it was
    # Same batches, same weights: the resumed run validates exactly like the whole one.
    for key in ("val_dice", "val_loss", "val_dice_pos", "lr", "step"):
        assert rows[1][key] == pytest.approx(reference[1][key]), key
    assert result["postprocess"] == expected["postprocess"]


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

    def crash_at_step_2(report: dict[str, Any]) -> None:
        if report["step"] == 2:  # after last.pt of step 1, before the epoch end
            raise Crash

    with pytest.raises(Crash):
        train_segment(cfg, progress=crash_at_step_2)
    assert load_checkpoint(cfg.out, "last")["step"] == 1
    result = train_segment(replace(cfg, resume=True))
    assert result["step"] == 2
    assert load_checkpoint(cfg.out, "best")["step"] == 2
    bucket = s3_bucket.removeprefix("s3://")
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="runs/r1/")
    names = {o["Key"].removeprefix("runs/r1/") for o in listed["Contents"]}
    assert {"config.json", "metrics.jsonl", "curves.png", "postprocess.json"} <= names


def test_a_run_folder_is_never_overwritten_or_resumed_on_other_data(
    demo: str, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="last.pt"):
        train_segment(small(demo, tmp_path / "empty", resume=True))
    cfg = small(demo, tmp_path / "run", epochs=1, steps_per_epoch=1)
    train_segment(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        train_segment(cfg)
    other = replace(cfg, where="split == 'train' and has_ptx", resume=True)
    with pytest.raises(ConfigError, match="manifest_fingerprint"):
        train_segment(other)


def test_config_is_checked_on_construction() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        small("data", "run", size=100)
    with pytest.raises(ConfigError, match="pos"):
        small("data", "run", pos_rate=(0.8, 1.5))
    with pytest.raises(ConfigError, match="batch-size"):
        small("data", "run", batch_size=0)
    with pytest.raises(ConfigError, match="dice_weight"):
        small("data", "run", focal_weight=0, dice_weight=0)


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    factors = [lr_factor(s, warmup=4, total=20) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, cfg: SegmentConfig) -> None:
    # What torchrun sets for each process.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    train_segment(cfg)


@pytest.mark.slow
def test_two_gloo_ranks_on_one_shard_take_equal_steps(one_shard_dataset, tmp_path: Path) -> None:
    """30 labelled training images in a single shard, 2 ranks: neither may run short."""
    cfg = small(one_shard_dataset.url, tmp_path / "ddp", steps_per_epoch=None)
    mp.spawn(_rank_main, args=(2, _free_port(), cfg), nprocs=2, join=True)

    rows = metrics(cfg.out)
    labelled_train = len(one_shard_dataset.keys("train"))
    steps = labelled_train // (4 * 2)
    assert [r["batches_per_rank"] for r in rows] == [[steps, steps], [steps, steps]]
    assert all(r["val_n_images"] == len(one_shard_dataset.keys("val")) for r in rows)
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["world_size"] == 2 and config["steps_per_epoch"] == steps
    assert load_checkpoint(cfg.out, "last")["step"] == 2 * steps
    assert (tmp_path / "ddp" / "postprocess.json").exists()
