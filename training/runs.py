"""What every training run shares: the process group and the RUN folder.

A RUN is a store (a local folder or ``s3://bucket/prefix``, see :mod:`shards.store`)::

    RUN/
      config.json            the full config, written at start
      metrics.jsonl          one JSON line per epoch (appended; continued on --resume)
      curves.png             loss / Dice / learning-rate curves, redrawn each epoch
      checkpoints/last.pt    written every ``checkpoint_every`` steps and at each epoch end
      checkpoints/best.pt    the epoch with the best validation score
      postprocess.json       (segment) the post-processing triplet chosen on validation
      eval/<split>.parquet   (evaluate) per-image results, eval/<split>.json the summary

Under torchrun only rank 0 writes to the RUN; every rank reads ``last.pt`` on ``--resume``,
so a multi-node job needs a RUN all nodes see (``s3://`` or a shared file system).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shards.errors import ConfigError
from shards.store import Store, open_store

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
POSTPROCESS_FILE = "postprocess.json"


# --- the process group ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 when run directly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistEnv:
        """Read the variables torchrun sets: the only place training reads the environment."""
        try:
            env = cls(
                rank=int(os.environ.get("RANK", "0")),
                world_size=int(os.environ.get("WORLD_SIZE", "1")),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            )
        except ValueError as e:
            raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from e
        if env.world_size > 1 and not os.environ.get("MASTER_ADDR"):
            raise ConfigError(
                "WORLD_SIZE > 1 but MASTER_ADDR is not set: start multi-process training "
                "with torchrun (e.g. torchrun --nproc-per-node 2 $(which pneumo) train segment ...)"
            )
        return env

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_device(env: DistEnv) -> torch.device:
    """Join the process group (NCCL on GPU, gloo on CPU) and pick this rank's device."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick kernels
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    return device


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``enabled``; nothing on CPU (bf16 matmuls are slow there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def images_to(device: torch.device, images: torch.Tensor) -> torch.Tensor:
    """A batch of images on ``device``; channels-last on CUDA (faster convolutions)."""
    if device.type == "cuda":
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_state(env: DistEnv, module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers.

    DDP keeps parameters equal but lets BatchNorm running statistics drift apart (each rank
    updates them with its own last batch): sync them before evaluating.
    """
    if env.distributed:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def gather(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# --- the RUN folder ---------------------------------------------------------------------


class RunDir:
    """A RUN folder in a store; writes nothing unless ``writer`` (rank 0)."""

    def __init__(self, url: str, *, writer: bool = True) -> None:
        self.url = str(url)
        self.writer = writer
        self.store: Store = open_store(self.url)  # every rank may read (resume)

    def exists(self, path: str) -> bool:
        return self.store.exists(path)

    def write_json(self, path: str, obj: Any) -> None:
        if self.writer:
            self.store.put(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def put(self, path: str, data: bytes) -> None:
        if self.writer:
            self.store.put(path, data)

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` (empty when there is none yet)."""
        if not self.store.exists(METRICS_FILE):
            return []
        lines = self.store.get(METRICS_FILE).decode().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def write_metrics(self, rows: Sequence[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` whole (stores have no append) and redraw the curves."""
        if not self.writer:
            return
        # NaN (e.g. Dice on positives of a split without any) is written as null: strict JSON.
        clean = [{k: None if v != v else v for k, v in row.items()} for row in rows]
        text = "".join(json.dumps(row, sort_keys=True, allow_nan=False) + "\n" for row in clean)
        self.store.put(METRICS_FILE, text.encode())
        self.store.put(CURVES_FILE, plot_curves(rows))


def plot_curves(rows: Sequence[dict[str, Any]]) -> bytes:
    """A PNG of the per-epoch curves: losses, validation Dice, learning rate."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        ("loss", ["train_loss", "val_loss"]),
        ("validation Dice", ["val_dice", "val_dice_pos", "val_empty_dice"]),
        ("learning rate", ["lr"]),
    ]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            values = [r.get(key) for r in rows]
            ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
