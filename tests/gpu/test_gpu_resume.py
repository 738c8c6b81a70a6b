"""On a CUDA machine (``pytest -m gpu tests/gpu``): each task's run stopped in the middle of
its second epoch and resumed ends where the uninterrupted run ends, within what reduced
precision and GPU kernels let two identical runs differ by; and ``torchrun`` on two GPUs.

On a GPU the same steps are not bit-reproducible: cuDNN may pick other kernels and some
reduce with atomics, bf16 keeps 8 significant bits and fp16 11. So the tolerance is measured,
not guessed: a second uninterrupted run gives the noise of a rerun, and the resumed run may
differ from the first by twice that, or by 5% when the reruns happen to agree exactly, all as
a share of how far the last two steps moved the weights (the steps a resume redoes). Bugs
planted on the CPU (optimizer moments dropped on resume, the stream restarted at the epoch's
first batch, the RNG not restored) moved the final weights by 12% to 270% of that; so the
rerun noise must stay under 10% for the check to tell a bug from rounding, and the test
says so when it does not.

The CPU suite checks resumes exactly (tests/training/: segment and classify mid-epoch, the
VAE at an epoch boundary). The same body runs here on the CPU for the one case it lacks, a
VAE resumed mid-epoch (float32 on the CPU: bit-reproducible, so no tolerance).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from pneumo.shards import selections
from pneumo.training.autoencode import AutoencodeConfig, train_autoencode
from pneumo.training.checkpoint import load_checkpoint
from pneumo.training.classify import ClassifyConfig, train_classify
from pneumo.training.segment import SegmentConfig, train_segment

GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
EPOCHS, STEPS = 2, 4  # 8 steps; the cut comes at step 6, the middle of the second epoch
CUT = STEPS + STEPS // 2
# The resumed run's distance from the whole run's weights, as a share of what steps 7-8 did:
NOISE_FACTOR = 2.0  # at most twice a rerun's
FLOOR = {"cuda": 0.05, "cpu": 1e-6}  # or this, when reruns agree exactly (the CPU always)
MAX_NOISE = 0.1  # a rerun noisier than this could hide the smallest planted bug (12%)
VAL_LOSS_REL = {"cuda": 0.02, "cpu": 1e-6}  # the validation loss's relative floor
CASES = [
    *(
        pytest.param(task, precision, "cuda", marks=GPU)
        for task in ("segment", "classify", "autoencode")
        for precision in ("bf16", "fp16")
    ),
    # On the CPU too: a VAE resumed mid-epoch draws its noise where the whole run did
    # (found here: the loader's iterator once drew torch's global RNG).
    pytest.param("autoencode", "fp32", "cpu"),
]  # fmt: skip


def configs(dataset: str, out: Path, precision: str, size: int) -> dict[str, tuple[Any, Callable]]:
    """Each task's small run: batch 4, 2 epochs of 4 steps, 2 loader workers."""
    common = {"dataset": dataset, "size": size, "batch_size": 4, "epochs": EPOCHS,
              "steps_per_epoch": STEPS, "workers": 2, "precision": precision}  # fmt: skip
    return {
        "segment": (
            SegmentConfig(
                **common, out=str(out / "segment"), encoder="resnet18", warmup_steps=2, lr=1e-3
            ),
            train_segment,
        ),
        "classify": (
            ClassifyConfig(
                **common,
                out=str(out / "classify"),
                arch="resnet18",
                where=selections.SIIM_TRAIN,
                val_where=selections.SIIM_VAL,
                precise_bn=4,
            ),
            train_classify,
        ),
        "autoencode": (
            AutoencodeConfig(
                **common, out=str(out / "autoencode"), kind="vae", latent_dim=16, lr=1e-3
            ),
            train_autoencode,
        ),
    }


def weights(run: str, which: str = "last") -> dict[str, torch.Tensor]:
    """The float tensors (parameters and BatchNorm statistics) of a checkpoint."""
    state = load_checkpoint(run, which)["model"]
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def val_rows(run: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def cut_and_resume(cfg: Any, train: Callable, out: str) -> dict[str, torch.Tensor]:
    """The run stopped by a Ctrl-C after step ``CUT`` (the loop saves last.pt there), then
    resumed in-process; the weights it was stopped with."""
    cut = replace(cfg, out=out)

    def ctrl_c(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == CUT:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cut, progress=ctrl_c)
    assert load_checkpoint(out, "last")["step"] == CUT
    stopped = weights(out)
    assert train(cut)["step"] == EPOCHS * STEPS
    return stopped


@pytest.mark.parametrize(("task", "precision", "device"), CASES)
def test_a_run_resumed_mid_epoch_ends_where_the_whole_run_ends(
    dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str, precision: str,
    device: str,
) -> None:  # fmt: skip
    if device == "cpu":  # the loop takes CUDA where there is one
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    size = 128 if device == "cuda" else 64
    cfg, train = configs(dataset.url, tmp_path, precision, size)[task]
    assert train(cfg)["step"] == EPOCHS * STEPS
    stopped = cut_and_resume(cfg, train, str(tmp_path / "cut"))
    runs = {"whole": cfg.out, "cut": str(tmp_path / "cut")}
    if device == "cuda":
        runs["again"] = str(tmp_path / "again")
        assert train(replace(cfg, out=runs["again"]))["step"] == EPOCHS * STEPS

    final = {name: weights(run) for name, run in runs.items()}
    moved = distance(final["whole"], stopped)  # what steps 7 and 8 did
    noise = distance(final["again"], final["whole"]) / moved if "again" in final else 0.0
    off = distance(final["cut"], final["whole"]) / moved
    assert noise < MAX_NOISE, f"two identical runs differ by {noise:.1%} of the last 2 steps"
    assert off <= max(NOISE_FACTOR * noise, FLOOR[device]), f"off {off:.2%}, noise {noise:.2%}"

    rows = {name: val_rows(run) for name, run in runs.items()}
    assert [r["epoch"] for r in rows["cut"]] == [0, 1]  # epoch 0 kept, epoch 1 done once
    for epoch in (0, 1):
        ref = rows["whole"][epoch]["val_loss"]
        rerun = abs(rows["again"][epoch]["val_loss"] - ref) if "again" in rows else 0.0
        allowed = max(NOISE_FACTOR * rerun, VAL_LOSS_REL[device] * abs(ref))
        assert abs(rows["cut"][epoch]["val_loss"] - ref) <= allowed, (epoch, rows)
        assert rows["cut"][epoch]["lr"] == pytest.approx(rows["whole"][epoch]["lr"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torchrun_on_two_gpus_trains_segment(dataset, tmp_path: Path, free_port: int) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [
            str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port),
            "-m", "pneumo", "train", "segment", dataset.url, "--out", str(out), "--size", "128",
            "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "2", "--workers", "1",
            "--encoder", "resnet18", "--warmup-steps", "1",
        ],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = val_rows(str(out))
    assert row["batches_per_rank"] == [3, 3] and row["step"] == 3
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    last = load_checkpoint(str(out), "last")
    assert last["world_size"] == 2 and last["config"]["precision"] == "bf16"
    assert all(torch.isfinite(v).all() for v in weights(str(out)).values())
    assert (out / "postprocess.json").exists()  # the end of the run: rank 0's search
    shutil.rmtree(out)
