"""What a training task is: its config (a :class:`RunConfig` subclass) and a :class:`Task`.

:func:`pneumo.training.loop.run` trains any task; its module docstring says what the loop
owns, and so what a task leaves out.

Writing a task (the ``train autoencode`` task is one whose batches have no labels)::

    @dataclass(frozen=True, kw_only=True)
    class AutoencodeConfig(RunConfig):       # RunConfig: dataset, out, where, size, ...
        where: str = "split == 'train'"      # unlabelled rows are fine
        val_where: str = "split == 'val'"
        lr: float = 1e-3

    class AutoencodeTask(Task):
        name = "autoencode"                  # stored in every checkpoint
        best = ("val_loss", "min")           # the metrics.jsonl field that picks best.pt
        headline = ("val_loss",)             # shown in the per-epoch line
        panels = (Panel("loss", (("train_loss", "training reconstruction loss"),
                                 ("val_loss", "validation reconstruction loss"))), LR_PANEL)
        schedule_on = "step"                 # scheduler.step() per step; "val_loss": per
                                             # epoch with the all-reduced val loss; None
        def prepare_rows(self, rows, *, train): return rows      # keep unlabelled rows
        def pools(self, rows): return {stream.ALL: stream.entries_from_table(rows)}
        def model_args(self): return {"arch": ..., ...}          # JSON-able; extend
        def build_model(self): ...           # pneumo.training.model.build_model to rebuild it
                                             # from a checkpoint; random init (seeded)
        def optimizer(self, model): return torch.optim.Adam(model.parameters(), self.cfg.lr)
        def loss(self, job, batch):          # one training batch -> scalar loss
            x = images_to(job.device, batch["image"])            # no label is read
            return F.mse_loss(job.net(x).float(), x)             # job.net: DDP-wrapped
        def validate(self, job, batches):    # this rank's part, picklable, via job.model
            total, n = 0.0, 0
            for b in batches:
                x = images_to(job.device, b["image"])
                total += float(F.mse_loss(job.model(x).float(), x, reduction="sum"))
                n += len(x)
            return total, n
        def summarise(self, parts):          # every rank's parts -> metrics; needs "loss"
            n = sum(p[1] for p in parts)
            return {"loss": sum(p[0] for p in parts) / n, "n_images": n}

    def train_autoencode(cfg, progress=None): return loop.run(AutoencodeTask(cfg), progress)

The stream trains on whatever ``pools`` holds: unlabelled rows too (a task without labels
never reads ``batch["has_ptx"]`` or ``batch["mask"]``, which are then False / all zero).
Optional hooks: ``Task.use_rows`` (every rank, with the pinned rows: labels by key),
``Task.init_weights`` (fresh start: load weights, return their init chain, e.g.
:func:`pneumo.training.transfer.load_encoder_weights`), ``Task.scheduler``, ``Task.finish``,
``Task.fingerprints``, ``Task.loader``. ``validate`` runs under ``torch.no_grad()``,
``model.eval()`` and autocast, on every rank with its share of the val rows (possibly none).
A hook's ``job`` is the run in progress (:class:`pneumo.training.job.Job`).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import torch
from torch import nn

from pneumo.shards import stream
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import is_s3_url
from pneumo.training.data import LoaderConfig
from pneumo.training.runs import PRECISIONS, Panel

if TYPE_CHECKING:
    from pneumo.training.job import Job

RESUME_MODES = ("auto", "never", "always")
IMAGES_PER_READING = 1000  # images trained between two training-loss readings (default)


def absolute(url: str) -> str:
    """``url`` as given when it is ``s3://`` or absolute, else as an absolute path."""
    return url if is_s3_url(url) or os.path.isabs(url) else os.path.abspath(url)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The settings every task has; a task's config subclasses it and adds its own.

    Attributes:
        dataset: the DATASET (folder or s3://); stored absolute, so the RUN is relocatable.
        out: the RUN (folder or s3://) for checkpoints, rows, metrics and plots.
        where, val_where: manifest filters of the training and validation rows.
        size: square input side in pixels.
        batch_size: images per step per rank.
        epochs: passes of ``steps_per_epoch`` steps.
        steps_per_epoch: None: training rows // (batch_size x world size).
        workers: loader processes per rank; they shape the stream (batch ``j`` comes from
            worker ``j % workers``). None: the run's own on a resume, and on a fresh start
            :func:`pneumo.training.runs.default_workers` of the CPUs this process may use
            (affinity and cgroup quota) shared by the node's processes (rank 0's count).
        seed: seeds model init, sampling and augmentation.
        resume: ``auto`` | ``never`` | ``always`` (see :mod:`pneumo.training.loop`).
        in_channels: image channels (1: grey; 3: the grey image replicated).
        checkpoint_every: steps between ``last.pt`` writes (also written at each epoch end).
        precision: ``bf16`` (default) | ``fp16`` | ``fp32``: the autocast dtype of the
            training step, PreciseBN and validation on GPU; ``fp16`` scales the loss with a
            ``torch.amp.GradScaler`` (its state is in every resumable checkpoint). On CPU
            everything runs in float32, whatever is asked. None (not given): ``bf16``, or
            ``fp32`` for a legacy ``amp=False``. A resume must have the run's precision.
        amp: derived: whether the precision autocasts (not ``fp32``); what configs and
            checkpoints written before ``precision`` hold, and what older readers use.
        compile: ``torch.compile`` the model for the training step (PreciseBN, validation
            and checkpoints use the plain module: no ``_orig_mod.`` in state-dict keys).
        log_every: steps between the readings of the training loss that the progress
            callback gets; each reading waits for the device to finish the steps queued (a
            host-device sync), so it is not done every step. None:
            :func:`default_log_every`, about one reading a second at 1,000 images a second.
        allow_overlap: train even when training patients are in the SIIM val/test rows.
        train_fraction: the share of the training patients that trains (whole patients,
            after the task's row filter; :func:`pneumo.shards.selections.patient_subset`:
            the patients of a smaller fraction are among those of a larger); 1: all.
        precise_bn: training batches over which BatchNorm statistics are re-estimated
            before each validation (:func:`pneumo.training.loop.precise_bn`); 0: not re-estimated.
    """

    dataset: str
    out: str
    where: str
    val_where: str
    size: int = 512
    batch_size: int = 8
    epochs: int = 10
    steps_per_epoch: int | None = None
    workers: int | None = None
    seed: int = 0
    resume: str = "auto"
    in_channels: int = 1
    checkpoint_every: int = 500
    precision: str | None = None
    amp: bool = True
    compile: bool = False
    log_every: int | None = None
    allow_overlap: bool = False
    train_fraction: float = 1.0
    precise_bn: int = 0
    cache_dir: str | None = None
    cache_limit: int = 50 * 2**30

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset", absolute(self.dataset))
        # precision wins; a legacy amp alone (configs from before precision) decides it.
        if self.precision is None:
            object.__setattr__(self, "precision", "bf16" if self.amp else "fp32")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: expected one of {PRECISIONS}")
        object.__setattr__(self, "amp", self.precision != "fp32")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("--workers must not be negative (0 reads in the main process)")
        if self.log_every is not None and self.log_every < 1:
            raise ConfigError(f"--log-every must be at least 1, got {self.log_every}")
        if self.resume not in RESUME_MODES:
            raise ConfigError(f"--resume {self.resume!r}: expected one of {RESUME_MODES}")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.precise_bn < 0:
            raise ConfigError(f"--precise-bn must not be negative, got {self.precise_bn}")
        for name in ("epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be at least 1, got {self.steps_per_epoch}")

    @property
    def loader_workers(self) -> int:
        """``workers``, with 0 standing in until the loop settles an unset one (so a config
        can run the loader's checks when it is made)."""
        return 0 if self.workers is None else self.workers

    def to_dict(self) -> dict[str, Any]:
        """The config as stored in config.json and checkpoints (JSON types: tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))


def default_log_every(batch_size: int, world_size: int) -> int:
    """Steps between training-loss readings when ``log_every`` is not given: about one a
    second at 1,000 images a second (``1000 // (batch_size x world_size)``, at least 1):
    what a reading costs (the device idles while the host catches up, about one step's
    kernel launches) is lost in a second's work, and the bar still changes every second.
    Every step is still reported, without its loss: the bar moves and a callback can stop
    the run at any step."""
    return max(1, IMAGES_PER_READING // (batch_size * world_size))


class Task(ABC):
    """What a task supplies to :func:`pneumo.training.loop.run` (see the module doc for an
    example); the abstract methods are what every task must define."""

    name: ClassVar[str]
    best: ClassVar[tuple[str, str]]  # (metrics.jsonl field, "max" | "min")
    headline: ClassVar[tuple[str, ...]]  # fields of the per-epoch line
    panels: ClassVar[tuple[Panel, ...]]  # curves.png
    schedule_on: ClassVar[str | None] = "step"  # "step" | "val_loss" | None

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def loader(self, *, train: bool) -> LoaderConfig:
        """How to stream batches (``train``: augmented, with the task's positive rate)."""
        cfg = self.cfg
        return LoaderConfig(
            dataset=cfg.dataset,
            size=cfg.size,
            batch_size=cfg.batch_size,
            workers=cfg.loader_workers,
            seed=cfg.seed,
            pos_rate=self.pos_rate() if train else None,
            augment=train,
            in_channels=cfg.in_channels,
            cache_dir=cfg.cache_dir,
            cache_limit=cfg.cache_limit,
        )

    def pos_rate(self) -> tuple[float, float] | None:
        return None

    def prepare_rows(self, rows: pa.Table, *, train: bool) -> pa.Table:
        """The selected rows the run pins (fresh start, rank 0): filter, add a ``label``..."""
        return rows

    def use_rows(self, train: pa.Table, val: pa.Table) -> None:
        """Every rank, fresh or resumed: the pinned rows (e.g. to map keys to labels)."""
        return None  # an optional hook: most tasks need nothing from the rows

    def pools(self, rows: pa.Table) -> dict[str, list[stream.Entry]]:
        """The classes the training stream draws from (see ``stream.batch_draws``)."""
        return {stream.ALL: stream.entries_from_table(rows)}

    def fingerprints(self) -> dict[str, str]:
        """Fingerprints of the task's own inputs (e.g. a label table), at a fresh start."""
        return {}

    @abstractmethod
    def model_args(self) -> dict[str, Any]:
        """The model's constructor arguments (JSON-able; stored in checkpoints)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The network, randomly initialised (torch is seeded before)."""

    def init_weights(self, model: nn.Module) -> list[dict[str, Any]]:
        """Load initial weights (fresh start); their init chain, or [] for random init."""
        return []

    @abstractmethod
    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s parameters."""

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        return None

    @abstractmethod
    def loss(self, job: Job, batch: dict[str, Any]) -> torch.Tensor:
        """One training batch -> a scalar loss (through ``job.net``)."""

    @abstractmethod
    def validate(self, job: Job, batches: Iterable[dict[str, Any]]) -> Any:
        """This rank's validation part (picklable), through ``job.model``."""

    @abstractmethod
    def summarise(self, parts: list[Any]) -> dict[str, Any]:
        """Every rank's parts -> the validation figures; must hold ``loss``."""

    def finish(self, job: Job) -> dict[str, Any]:
        """After the last epoch, on every rank; extra entries of the summary."""
        return {}
