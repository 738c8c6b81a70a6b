"""A training run, on one rank of several (ranks_helper), that records the keys of every
batch it trains and can stop before a given step, as a preempted pod would."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from test_log_every import TinyTask

from pneumo.training import loop


class ScheduledTiny(TinyTask):
    """TinyTask with a learning rate that falls every step: what the schedule does after an
    elastic resume shows in metrics.jsonl's lr."""

    schedule_on = "step"

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))


def recorded_run(args: tuple[Any, int | None, str]) -> None:
    """Train ``cfg``, appending ``{"step", "keys"}`` of each batch to LOG/rank<R>.jsonl;
    stop before step ``stop`` (None: run to the end) on every rank at once."""
    cfg, stop, log = args
    rank = int(os.environ.get("RANK", "0"))
    trained = loop._train_step

    def step(job: Any, batch: dict[str, Any]) -> torch.Tensor:
        if job.step == stop:
            raise KeyboardInterrupt  # each rank at the same step: last.pt holds it
        with (Path(log) / f"rank{rank}.jsonl").open("a") as f:
            f.write(json.dumps({"step": job.step, "keys": list(batch["key"])}) + "\n")
        return trained(job, batch)

    loop._train_step = step
    try:
        loop.run(ScheduledTiny(cfg))
    except KeyboardInterrupt:
        pass
