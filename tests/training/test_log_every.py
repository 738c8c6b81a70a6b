"""The training loss is summed on the device and read (a host-device sync) only every
``log_every`` steps and at each epoch's end, never every step; each reading is the mean of
exactly the steps since the one before, and metrics.jsonl keeps its per-epoch lines.

``TinyTask`` (a few hundred weights on 32 px images, a loss with no read of its own) is the
loop's cheapest task; tests/training/test_workers.py and test_precision.py use it too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.commands.train import TrainProgress
from pneumo.training import loop, segment
from pneumo.training.job import Job
from pneumo.training.runs import Panel, images_to
from pneumo.training.task import RunConfig, Task, default_log_every


class TinyTask(Task):
    """Predict each image's mean brightness: a conv, a BatchNorm (for PreciseBN), a linear."""

    name = "tiny"
    best = ("val_loss", "min")
    headline = ("train_loss", "val_loss")
    panels = (Panel("loss", (("train_loss", "training"), ("val_loss", "validation"))),)
    schedule_on = None

    def model_args(self) -> dict[str, Any]:
        return {"kind": "tiny"}

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 1),
        )

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.05)

    def loss(self, job: Any, batch: dict[str, Any]) -> torch.Tensor:
        x = images_to(job.device, batch["image"])
        return (job.net(x).float()[:, 0] - x.mean(dim=(1, 2, 3))).pow(2).mean()

    def validate(self, job: Any, batches: Any) -> tuple[float, int]:
        total, n = 0.0, 0
        for batch in batches:
            x = images_to(job.device, batch["image"])
            total += float((job.model(x).float()[:, 0] - x.mean(dim=(1, 2, 3))).pow(2).sum())
            n += len(x)
        return total, n

    def summarise(self, parts: list[tuple[float, int]]) -> dict[str, Any]:
        n = sum(p[1] for p in parts)
        return {"loss": sum(p[0] for p in parts) / n if n else float("nan"), "n_images": n}


def tiny(dataset: str, out: Path | str, **changes: Any) -> RunConfig:
    """Fractions of a second a step on CPU: 32 px, batches of 2, in-process loading."""
    base: dict[str, Any] = dict(
        dataset=dataset,
        out=str(out),
        where="split == 'train'",
        val_where="split == 'val'",
        size=32,
        batch_size=2,
        epochs=1,
        steps_per_epoch=7,
        workers=0,
        checkpoint_every=1000,
    )
    return RunConfig(**{**base, **changes})


def metrics(run: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def loop_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The steps at which the loop (loop.py's own code) reads a tensor on the host while an
    epoch trains; filled as the run goes."""
    reads: list[int] = []
    current: dict[str, Job | None] = {"job": None}
    train_epoch = loop._train_epoch

    def flagged(job: Job, epoch: int) -> dict[str, Any]:
        current["job"] = job
        try:
            return train_epoch(job, epoch)
        finally:
            current["job"] = None

    monkeypatch.setattr(loop, "_train_epoch", flagged)
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *a: Any, _original: Any = original, **k: Any) -> Any:
            job = current["job"]
            if job is not None and sys._getframe(1).f_code.co_filename == loop.__file__:
                reads.append(job.step)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


def test_the_loss_is_read_every_log_every_steps_and_at_each_epoch_end(
    dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 epochs of 7 steps, log_every 3: readings after steps 3, 6, 7 (the epoch's end), 9,
    12 and 14, each the mean of the per-step losses since the reading before (9: steps 8
    and 9 only, the new epoch's). The loop reads a tensor on the host only for them."""
    losses: list[torch.Tensor] = []  # each step's loss, as the step computed it
    task_loss = TinyTask.loss

    def recorded(self: TinyTask, job: Any, batch: dict[str, Any]) -> torch.Tensor:
        out = task_loss(self, job, batch)
        losses.append(out.detach().clone())  # a copy on the device: not a read
        return out

    monkeypatch.setattr(TinyTask, "loss", recorded)
    reads = loop_reads(monkeypatch)
    events: list[dict[str, Any]] = []
    cfg = tiny(dataset.url, tmp_path / "run", epochs=2, log_every=3)
    loop.run(TinyTask(cfg), progress=events.append)
    monkeypatch.undo()

    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 15))  # the position: every step
    readings = [e for e in steps if "loss" in e]
    assert [e["step"] for e in readings] == [3, 6, 7, 9, 12, 14]
    assert reads == [3, 6, 7, 9, 12, 14]  # one read each, no more
    assert len(losses) == 14
    done = 0
    for e in readings:
        mine = torch.stack(losses[done : e["step"]]).double().mean().item()
        assert e["loss_steps"] == e["step"] - done
        assert e["loss"] == pytest.approx(mine, rel=1e-6), e["step"]
        assert e["images_per_s"] > 0
        done = e["step"]
    # metrics.jsonl: one line per epoch, as before (its readers expect nothing else).
    rows = metrics(cfg.out)
    assert [r["epoch"] for r in rows] == [0, 1]
    expected_keys = {
        "epoch", "step", "lr", "lr_per_rank", "train_loss", "images_per_s",
        "batches_per_rank", "time_s", "val_loss", "val_n_images",
    }  # fmt: skip
    assert all(set(r) == expected_keys for r in rows)
    for r, first in zip(rows, (0, 7), strict=True):
        mine = torch.stack(losses[first : first + 7]).double().mean().item()
        assert r["train_loss"] == pytest.approx(mine, rel=1e-6)


def test_without_a_progress_callback_nothing_is_read_during_the_epoch(
    dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No one to report to (a rank other than 0, a library call): no reading at all."""
    reads = loop_reads(monkeypatch)
    loop.run(TinyTask(tiny(dataset.url, tmp_path / "run", log_every=1)))
    monkeypatch.undo()
    assert reads == []


def test_the_default_is_about_one_reading_a_second_at_1000_images_a_second(
    dataset, tmp_path: Path
) -> None:
    assert default_log_every(batch_size=8, world_size=1) == 125
    assert default_log_every(batch_size=32, world_size=1) == 31
    assert default_log_every(batch_size=8, world_size=8) == 15
    assert default_log_every(batch_size=2048, world_size=1) == 1
    events: list[dict[str, Any]] = []
    loop.run(TinyTask(tiny(dataset.url, tmp_path / "run")), progress=events.append)
    # 1000 // 2 = 500 steps: the 7-step epoch is read at its end only.
    assert [e["step"] for e in events if "loss" in e] == [7]


def test_the_bar_keeps_the_last_reading_between_readings() -> None:
    shown: list[dict[str, Any]] = []

    class Bar:
        def update_to(self, done: int, total: int | None = None, **postfix: Any) -> None:
            shown.append({"done": done, **postfix})

    render = TrainProgress(Bar())  # type: ignore[arg-type]
    base = {"event": "step", "total": 10, "epoch": 0, "epochs": 2}
    render({**base, "step": 1})
    render({**base, "step": 2, "loss": 0.5, "loss_steps": 2, "images_per_s": 40.0})
    render({**base, "step": 3})
    assert shown[0] == {"done": 1, "epoch": "1/2"}
    assert shown[1] == shown[2] | {"done": 2} == {
        "done": 2, "epoch": "1/2", "loss": "0.5000", "img_s": "40.0"
    }  # fmt: skip


def test_log_every_reaches_the_config_from_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(segment, "train_segment", lambda cfg, progress=None: seen.append(cfg))
    args = ["train", "segment", str(tmp_path), "--out", str(tmp_path / "run")]
    CliRunner().invoke(app, [*args, "--log-every", "7"])
    CliRunner().invoke(app, args)
    assert [cfg.log_every for cfg in seen] == [7, None]
    assert "--log-every" in CliRunner().invoke(app, ["train", "classify", "--help"]).output
    assert "--log-every" in CliRunner().invoke(app, ["train", "autoencode", "--help"]).output


def test_the_readings_go_to_steps_jsonl_and_a_resume_keeps_its_own(dataset, tmp_path: Path) -> None:
    """RUN/steps.jsonl: every reading (step, epoch, mean loss, steps, images/s, lr), written
    with each last.pt. A run stopped at step 10 and resumed keeps the readings up to its
    step and adds the rest: no reading twice, none lost."""
    events: list[dict[str, Any]] = []
    cfg = tiny(dataset.url, tmp_path / "run", epochs=2, log_every=3)

    def stop_at_10(report: dict[str, Any]) -> None:
        events.append(report)
        if report["event"] == "step" and report["step"] == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.run(TinyTask(cfg), progress=stop_at_10)
    rows = steps_rows(cfg.out)
    readings = [e for e in events if "loss" in e and e["event"] == "step"]
    assert [r["step"] for r in rows] == [e["step"] for e in readings] == [3, 6, 7, 9]
    for r, e in zip(rows, readings, strict=True):
        assert (r["loss"], r["loss_steps"], r["epoch"]) == (e["loss"], e["loss_steps"], e["epoch"])
        assert r["lr"] == pytest.approx(0.05)  # TinyTask's SGD rate
    loop.run(TinyTask(cfg), progress=events.append)
    rows = steps_rows(cfg.out)
    assert [r["step"] for r in rows] == [3, 6, 7, 9, 12, 14]
    assert [r["loss_steps"] for r in rows][-2:] == [2, 2]  # 11-12 after the resume, 13-14


def steps_rows(run: Path | str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (Path(run) / "steps.jsonl").read_text().splitlines()]
