"""A training run in progress (:class:`Job`): what the loop, its start and a task's hooks share.

The loop (:mod:`pneumo.training.loop`) trains a Job that its start
(:mod:`pneumo.training.start`) made, and hands it to every hook of the task
(:class:`pneumo.training.task.Task`): kept in a module of its own, so the start and the
task files name it without importing the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from pneumo.shards import stream
from pneumo.training.run_loader import RunLoader
from pneumo.training.runs import DistEnv, RunDir
from pneumo.training.task import Task

Progress = Callable[[dict[str, Any]], None]
# The training-loss readings (every log_every steps, rank 0, when progress is reported):
# rewritten with each last.pt (stores have no append), so a resume keeps those of its steps.
STEPS_FILE = "steps.jsonl"


def _no_scaling() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=False)


@dataclass(kw_only=True)
class Job:
    """A run in progress: what stays fixed (config, model...) and where the loop is."""

    cfg: Any  # the task's RunConfig subclass
    task: Task
    env: DistEnv
    device: torch.device
    run: RunDir
    spe: int  # steps per epoch
    total: int
    meta: dict[str, Any]  # the checkpoint fields that do not change
    train_rows: pa.Table
    val_rows: pa.Table
    val_entries: list[stream.Entry]
    pools: dict[str, list[stream.Entry]]  # the training stream's classes
    model: nn.Module  # the plain module: checkpoints, validation
    net: nn.Module  # what the training step calls: DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    progress: Progress | None
    loader: RunLoader | None = None  # None: a Job made by hand (tests)
    scaler: torch.amp.GradScaler = field(default_factory=_no_scaling)
    log_every: int = 1  # steps between the training-loss readings of ``progress``
    readings: list[dict[str, Any]] = field(default_factory=list)  # RUN/steps.jsonl's rows

    @property
    def step_images(self) -> int:
        """Images a step trains, over all processes: the plan's, whatever the layout."""
        plan = self.meta.get("plan") or {"world_size": self.env.world_size}
        return plan["world_size"] * self.cfg.batch_size

    step: int = 0
    saved_step: int = -1  # the step last.pt holds
    best_score: float | None = None
    history: list[dict[str, Any]]
