"""Ctrl-C and SIGTERM stop training at a step boundary with ``last.pt`` at the step reached,
the rerun ends where an uninterrupted run would, and a loader worker leaves quietly on a
SIGTERM (the CLI side: tests/test_signals.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from processes import children

from pneumo.render import Terminated
from pneumo.shards import selections
from pneumo.training.checkpoint import load_checkpoint
from pneumo.training.data import LoaderConfig, train_batches
from pneumo.training.loader_workers import _quiet_when_the_parent_hangs_up
from pneumo.training.segment import SegmentConfig, SegmentTask, train_segment


def small(dataset: str, out: Path) -> SegmentConfig:
    """Seconds on CPU: 64 px, ResNet-18, one epoch of 4 steps, last.pt every 2 steps, the
    4 small validation images (the post-processing search is at full resolution)."""
    return SegmentConfig(
        dataset=dataset,
        out=str(out),
        val_where=f"{selections.SIIM_VAL} and rows == 256",
        size=64,
        batch_size=4,
        epochs=1,
        steps_per_epoch=4,
        workers=0,
        warmup_steps=2,
        lr=1e-3,
        encoder="resnet18",
        pos_rate=None,
        checkpoint_every=2,
    )


def metrics(run: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run."""
    cfg = small(dataset.url, tmp_path_factory.mktemp("whole") / "run")
    return {"cfg": cfg, "result": train_segment(cfg), "metrics": metrics(cfg.out)}


@pytest.fixture
def sigterm_raises() -> Iterator[None]:
    """SIGTERM handled as the CLI handles it: Terminated, a KeyboardInterrupt."""

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_ctrl_c_saves_the_step_reached(whole, tmp_path: Path) -> None:
    cfg = replace(whole["cfg"], out=str(tmp_path / "run"))

    def ctrl_c_after_step_3(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segment(cfg, progress=ctrl_c_after_step_3)
    # The periodic last.pt was step 2: step 3 was saved on the way out.
    assert load_checkpoint(cfg.out, "last")["step"] == 3
    assert not list(Path(cfg.out).rglob("*.tmp"))


@pytest.mark.slow
def test_sigterm_during_a_step_finishes_it_then_saves_it(
    whole, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_raises: None
) -> None:
    cfg = replace(whole["cfg"], out=str(tmp_path / "run"))
    loss = SegmentTask.loss

    def sigterm_in_step_3(self: SegmentTask, job: Any, batch: Any) -> Any:
        if job.step == 2:  # steps done before this one
            signal.raise_signal(signal.SIGTERM)  # raises here, were it not held
        return loss(self, job, batch)

    monkeypatch.setattr(SegmentTask, "loss", sigterm_in_step_3)
    with pytest.raises(Terminated):
        train_segment(cfg)
    monkeypatch.undo()
    # Step 3 was finished, then saved, not dropped halfway (last.pt would be step 2's).
    assert load_checkpoint(cfg.out, "last")["step"] == 3
    # What a SIGKILL in the middle of a checkpoint write leaves: the next run removes it.
    stale = Path(cfg.out) / "checkpoints" / ".last.pt.0123456789abcdef.tmp"
    stale.write_bytes(b"\0" * 1024)
    result = train_segment(cfg)
    assert not stale.exists()
    # Weights, optimizer, schedule, RNG and stream position: the resumed step 4 and the
    # validation after it are the whole run's.
    assert result["step"] == whole["result"]["step"] == 4
    (row,) = metrics(cfg.out)
    for key in ("val_dice", "val_loss", "val_dice_pos", "lr", "step"):
        assert row[key] == pytest.approx(whole["metrics"][0][key]), key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_loader_worker_leaves_quietly_on_a_sigterm_from_anyone(dataset) -> None:
    """A SIGTERM to the whole group (timeout, systemd, Slurm) reaches the loader workers
    from another process than their parent: each leaves with status 0, which torch's check
    of its workers takes for a clean exit; killed by the signal, it would make torch raise
    "worker killed by signal" in the training process, maybe while it saves its place."""
    cfg = LoaderConfig(dataset=dataset.url, size=64, batch_size=2, workers=1)
    before = children()
    batches = train_batches(cfg, rank=0, world_size=1, epoch=0, steps_per_epoch=4, total_steps=4)
    try:
        next(batches)  # the worker is up
        (worker,) = children() - before
        subprocess.run(["kill", "-TERM", str(worker)], check=True)  # not from its parent
        ended = os.waitid(os.P_PID, worker, os.WEXITED | os.WNOWAIT)  # leaves it to torch
        assert (ended.si_code, ended.si_status) == (os.CLD_EXITED, 0)
    finally:
        batches.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("error", [BrokenPipeError, ConnectionResetError, EOFError])
def test_a_worker_keeps_quiet_when_the_parent_hangs_up_mid_batch(error, capsys) -> None:
    """The worker's resource-sharer thread (it hands a batch's tensors to the parent) reports
    through sys.excepthook; a SIGTERM'd parent leaving mid-transfer must not add a
    traceback under its one line. A real error of the worker still prints."""
    hook = _quiet_when_the_parent_hangs_up(sys.__excepthook__)
    try:
        raise error("the parent left")
    except error as e:
        hook(type(e), e, e.__traceback__)
    assert capsys.readouterr().err == ""
    try:
        raise ValueError("a real bug")
    except ValueError as e:
        hook(type(e), e, e.__traceback__)
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.rstrip().endswith("ValueError: a real bug")
