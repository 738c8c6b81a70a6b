"""What every training run shares: the process group and the RUN folder.

A RUN is a store (a local folder or ``s3://bucket/prefix``, see :mod:`pneumo.shards.store`)::

    RUN/
      config.json            the full config and the run's metadata, written at start
      rows/train.parquet     the pinned training rows (manifest columns, + the task's label)
      rows/val.parquet       the pinned validation rows
      metrics.jsonl          one JSON line per epoch (appended; continued on --resume)
      curves.png             the task's curves (losses, validation figures, lr), each epoch
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
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from pneumo.shards.errors import ConfigError, PneumoError
from pneumo.shards.store import Store, open_store

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
POSTPROCESS_FILE = "postprocess.json"
PRECISIONS = ("bf16", "fp16", "fp32")
MAX_DEFAULT_WORKERS = 16


# --- the process group ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 when run directly).

    ``local_world_size``: the processes on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1
    when it is not set), which share its CPUs (:func:`default_workers`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> DistEnv:
        """Read the variables torchrun sets: the only place training reads the environment."""
        try:
            env = cls(
                rank=int(os.environ.get("RANK", "0")),
                world_size=int(os.environ.get("WORLD_SIZE", "1")),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            )
        except ValueError as e:
            raise ConfigError(
                f"RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE must be integers: {e}"
            ) from e
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


def available_cpus(
    cgroup_root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup"
) -> int:
    """The CPUs this process may keep busy: its affinity mask (``taskset``, a cpuset),
    lowered by a CPU quota of its cgroup or of any cgroup above it (cgroup v2 ``cpu.max``,
    v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``: what a container's or a pod's CPU limit
    sets), rounded up. ``os.cpu_count()`` sees neither: in a pod limited to 4 CPUs of a
    64-CPU node it says 64. The paths are parameters for the tests."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quotas = [q for d in _cgroup_dirs(Path(cgroup_root), Path(self_cgroup)) if (q := _quota(d))]
    if quotas:
        cpus = min(cpus, math.ceil(min(quotas)))
    return max(1, cpus)


def _cgroup_dirs(root: Path, self_cgroup: Path) -> list[Path]:
    """This process's cgroup folders holding a CPU quota, its own first, then each parent up
    to the root (a container often sees its own cgroup as the root, and a path that is
    not there: the levels that do not exist are left out)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:  # "0::/path" (v2), "4:cpu,cpuacct:/path" (v1)
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base = root
        elif "cpu" in controllers.split(","):
            base = root / controllers  # a v1 hierarchy, e.g. /sys/fs/cgroup/cpu,cpuacct
            if not base.is_dir():
                base = root / "cpu"
        else:
            continue
        parts = [p for p in path.strip().split("/") if p]
        found += [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in found if d.is_dir()]


def _quota(folder: Path) -> float | None:
    """The CPUs a cgroup's quota allows (None: no quota, or none readable)."""
    try:
        if (folder / "cpu.max").is_file():  # v2: "max 100000" or "200000 100000"
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():  # v1: -1 without a quota
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def default_workers(cpus: int, local_world_size: int = 1) -> int:
    """Loader workers per training process when ``--workers`` is not given.

    The node's CPUs (:func:`available_cpus`) are shared by its ``local_world_size``
    training processes; each keeps one for itself (the step's Python, the batches' transfer)
    and gives the rest to its workers: at least 1, at most :data:`MAX_DEFAULT_WORKERS` (each
    worker holds its shuffle buffers and prefetched batches in memory; 16 decode well over
    1,000 images a second at 512 px).
    """
    share = cpus // max(1, local_world_size)
    return max(1, min(MAX_DEFAULT_WORKERS, share - 1))


def amp_dtype(device: torch.device, precision: str | bool) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: None (float32) on CPU whatever is
    asked (bf16 and fp16 matmuls are slow there), and for ``fp32``. ``True`` / ``False`` (a
    config's legacy ``amp``) mean ``bf16`` / ``fp32``."""
    if isinstance(precision, bool):
        precision = "bf16" if precision else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: expected one of {PRECISIONS}")
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, precision: str | bool) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``precision``'s dtype (see :func:`amp_dtype`); nothing where it is None."""
    dtype = amp_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The training step's gradient scaler: enabled only where the step runs in float16
    (bf16 has float32's range, so its gradients need no scaling). A disabled scaler passes
    the loss and the optimizer step through unchanged, so the step has one code path."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, precision) == torch.float16)


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``)
    wrappers, whose state dict has none of their key prefixes (``module.``, ``_orig_mod.``)."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
            module = module._orig_mod
        else:
            return module


def images_to(device: torch.device, images: torch.Tensor) -> torch.Tensor:
    """A batch of images on ``device`` as float32 in [0, 1] (see :func:`as_float`);
    channels-last on CUDA (faster convolutions)."""
    if device.type == "cuda":
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    else:
        images = images.to(device)
    return as_float(images)


def masks_to(device: torch.device, masks: torch.Tensor) -> torch.Tensor:
    """A batch's 0/1 masks (uint8 from the loader) on ``device`` as float32."""
    return masks.to(device, non_blocking=True).float()


def as_float(images: torch.Tensor) -> torch.Tensor:
    """A loader batch's images as float32 in [0, 1]: the loader ships 8-bit images as
    uint8 (``pneumo.training.data``), made float where they are used, ``uint8 / 255``."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the body is done, then act as they would have.

    Around a training step and a checkpoint write: an interruption between two steps leaves
    weights, optimizer and step count that agree (a position worth saving), never a step
    half applied. Only signals Python handles, in the main thread: a default SIGTERM still
    kills at once, an ignored one stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, FrameType | None]] = []
    saved = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            saved[signum] = handler
            signal.signal(signum, lambda s, f: held.append((s, f)))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        for signum, frame in held[:1]:
            saved[signum](signum, frame)  # raises KeyboardInterrupt, or the CLI's Terminated


def broadcast_state(env: DistEnv, module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers.

    DDP keeps parameters equal but lets BatchNorm running statistics drift apart (each rank
    updates them with its own last batch): sync them before evaluating.
    """
    if env.distributed:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def broadcast(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small things like a table of rows)."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only; its result, or the error of ours it raised, on every rank.

    Without this, an error on rank 0 (an empty selection, say) would leave the other ranks
    waiting for a broadcast until the process group's timeout.
    """
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except (PneumoError, OSError) as e:
            error = e
    result, error = broadcast(env, (result, error))
    if error is not None:
        raise error
    return result


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

    def clean_incomplete(self) -> None:
        """Delete the temp files of writes a killed run left (a ``.last.pt.*.tmp`` beside
        the checkpoints, a pinned-rows part); only the run's own writer may."""
        if self.writer:
            removed = sum(self.store.clean_incomplete(p) for p in ("checkpoints", "rows"))
            if removed:
                log.info("removed %d temp files a killed run left in %s", removed, self.url)

    def write_json(self, path: str, obj: Any) -> None:
        if self.writer:
            self.store.put(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def put(self, path: str, data: bytes) -> None:
        if self.writer:
            self.store.put(path, data)

    def put_table(self, path: str, table: pa.Table) -> None:
        if self.writer:
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            self.store.put(path, buf.getvalue())

    def get_table(self, path: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.store.get(path)))

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` (empty when there is none yet)."""
        if not self.store.exists(METRICS_FILE):
            return []
        lines = self.store.get(METRICS_FILE).decode().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def write_metrics(
        self, rows: Sequence[dict[str, Any]], panels: Sequence[Panel], title: str
    ) -> None:
        """Rewrite ``metrics.jsonl`` whole (stores have no append) and redraw the curves."""
        if not self.writer:
            return
        # NaN (e.g. Dice on positives of a split without any) is written as null: strict JSON.
        clean = [{k: None if v != v else v for k, v in row.items()} for row in rows]
        text = "".join(json.dumps(row, sort_keys=True, allow_nan=False) + "\n" for row in clean)
        self.store.put(METRICS_FILE, text.encode())
        self.store.put(CURVES_FILE, plot_curves(rows, panels, title))


@dataclass(frozen=True)
class Panel:
    """One plot of ``curves.png``: a title and the ``metrics.jsonl`` fields it draws, each
    with the label its legend shows (say what the line is, not just the field name)."""

    title: str
    lines: tuple[tuple[str, str], ...]  # (field, label)


LR_PANEL = Panel("learning rate", (("lr", "learning rate (end of the epoch)"),))


def plot_curves(rows: Sequence[dict[str, Any]], panels: Sequence[Panel], title: str) -> bytes:
    """A PNG of the per-epoch curves, one subplot per panel, titled with the run's name."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] + 1 for r in rows]  # epochs completed, as the progress lines count
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for key, label in panel.lines:
            values = [r.get(key) for r in rows]
            if all(v is None for v in values):
                continue  # a field this run does not have (e.g. no positives in val)
            ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=label)
        ax.set_title(panel.title)
        ax.set_xlabel("epochs completed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
