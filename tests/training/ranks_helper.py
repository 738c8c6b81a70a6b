"""Run a training function on several gloo ranks, as torchrun would, with a hang guard."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable[..., Any], cfg: Any) -> None:
    # What torchrun sets for each process.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    fn(cfg)


def run_ranks(fn: Callable[..., Any], cfg: Any, *, world_size: int = 2, limit_s: int = 600) -> None:
    """``fn(cfg)`` on ``world_size`` spawned ranks; fails (and kills them) when they have not
    all returned after ``limit_s`` seconds: a rank waiting on a collective the others never
    join would otherwise hang the suite."""
    ctx = mp.spawn(
        _rank_main, args=(world_size, _free_port(), fn, cfg), nprocs=world_size, join=False
    )
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            raise AssertionError(f"{world_size} ranks still running after {limit_s} s: a hang")
