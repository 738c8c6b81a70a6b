"""The one training loop every task shares (nanoGPT's loop, with tasks plugged in).

A task file (``training/segment.py``, ``training/classify.py``, ...) owns only its model,
its step, its validation metrics and its optimizer; :func:`run` owns everything else,
the same way for every task:

1. the process group and device (torchrun: NCCL on GPU, gloo on CPU); only rank 0 writes;
2. resume (``cfg.resume``): ``auto`` continues from ``RUN/checkpoints/last.pt`` when there
   is one and starts fresh otherwise, ``never`` refuses a RUN that holds a checkpoint,
   ``always`` needs one. A resume refuses, in one line, every setting that shapes the stream
   or the model and differs from the run's (dataset, where, size, batch size, workers,
   seed, sampling, model, encoder init, world size...): only :data:`FREE_ON_RESUME` may change;
3. the pinned rows: on a fresh start rank 0 selects ``cfg.where`` and ``cfg.val_where``
   once, the task filters them (:meth:`Task.prepare_rows`), and they are stored as
   ``RUN/rows/{train,val}.parquet`` and sent to every rank; a resumed run reads them back
   and checks their fingerprints against the checkpoint. A batch committed to the dataset
   during training changes nothing in the run;
4. the leakage guard (fresh start): no ``patient_key`` of the training rows may be in the
   SIIM val/test rows (:data:`shards.audit.HELD_OUT_WHERE`) unless ``allow_overlap``;
   what it found (and how many NIH patients the unified split keeps out) is recorded;
5. the model, built after seeding torch with ``cfg.seed`` (the same weights on every rank),
   its initial weights (:meth:`Task.init_weights`: the init chain), DDP, the optimizer and
   the schedule;
6. per epoch: exactly ``steps_per_epoch`` batches on every rank (DDP hangs otherwise);
   ``last.pt`` every ``checkpoint_every`` steps; validation on the plain module, never the
   DDP wrapper (ranks hold different numbers of validation batches), each rank's part
   gathered so every rank computes the same figures (a plateau schedule steps the same on
   every rank); a line in ``metrics.jsonl``, ``curves.png``, ``last.pt``, and ``best.pt``
   when ``Task.best`` improved;
7. :meth:`Task.finish` (segment: the post-processing search), then the summary.

On GPU: bf16 autocast around the step and the validation (``cfg.amp``), channels-last
images (:func:`training.runs.images_to`), pinned memory, cuDNN autotune.

Progress: ``progress`` (rank 0) gets ``{"event": "step", "step", "total", "epoch",
"epochs", "loss", "images_per_s"}`` after every step and ``{"event": "epoch", "epochs",
"headline", **metrics line}`` after every epoch.

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
        def model_args(self): return {"arch": ..., ...}          # JSON-able
        def build_model(self): ...           # random init; torch is already seeded
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

Optional hooks: :meth:`Task.use_rows` (every rank, with the pinned rows: labels by key),
:meth:`Task.init_weights` (fresh start: load weights, return their init chain),
:meth:`Task.scheduler`, :meth:`Task.finish`, :meth:`Task.fingerprints`, :meth:`Task.loader`.
``validate`` runs under ``torch.no_grad()``, ``model.eval()`` and autocast.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any, ClassVar

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shards import manifest, stream
from shards.audit import HELD_OUT_WHERE, held_out_overlap
from shards.errors import ConfigError, PneumoError
from shards.store import is_s3_url, open_store
from training import checkpoint as ckpts
from training.data import LoaderConfig, eval_batches, select, train_batches
from training.runs import (
    CONFIG_FILE,
    DistEnv,
    Panel,
    RunDir,
    autocast,
    broadcast_state,
    gather,
    on_main,
    setup_device,
    teardown,
)

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
RESUME_MODES = ("auto", "never", "always")
TRAIN_ROWS, VAL_ROWS = "rows/train.parquet", "rows/val.parquet"
# Settings that change nothing a run computes: a resumed run may differ in them.
FREE_ON_RESUME = frozenset({"out", "resume", "checkpoint_every"})


class TrainingError(PneumoError):
    """Training cannot go on (e.g. the data stream delivered fewer batches than planned)."""


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
        workers: loader processes per rank.
        seed: seeds model init, sampling and augmentation.
        resume: ``auto`` | ``never`` | ``always`` (see the module doc).
        in_channels: image channels (1: grey; 3: the grey image replicated).
        checkpoint_every: steps between ``last.pt`` writes (also written at each epoch end).
        amp: bf16 autocast on GPU (ignored on CPU).
        allow_overlap: train even when training patients are in the SIIM val/test rows.
    """

    dataset: str
    out: str
    where: str
    val_where: str
    size: int = 512
    batch_size: int = 8
    epochs: int = 10
    steps_per_epoch: int | None = None
    workers: int = 2
    seed: int = 0
    resume: str = "auto"
    in_channels: int = 1
    checkpoint_every: int = 500
    amp: bool = True
    allow_overlap: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset", absolute(self.dataset))
        if self.resume not in RESUME_MODES:
            raise ConfigError(f"--resume {self.resume!r}: expected one of {RESUME_MODES}")
        for name in ("epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be at least 1, got {self.steps_per_epoch}")

    def to_dict(self) -> dict[str, Any]:
        """The config as stored in config.json and checkpoints (JSON types: tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))


class Task:
    """What a task supplies to :func:`run` (see the module doc for an example)."""

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
            workers=cfg.workers,
            seed=cfg.seed,
            pos_rate=self.pos_rate() if train else None,
            augment=train,
            in_channels=cfg.in_channels,
        )

    def pos_rate(self) -> tuple[float, float] | None:
        return None

    def prepare_rows(self, rows: pa.Table, *, train: bool) -> pa.Table:
        """The selected rows the run pins (fresh start, rank 0): filter, add a ``label``..."""
        return rows

    def use_rows(self, train: pa.Table, val: pa.Table) -> None:
        """Every rank, fresh or resumed: the pinned rows (e.g. to map keys to labels)."""

    def pools(self, rows: pa.Table) -> dict[str, list[stream.Entry]]:
        """The classes the training stream draws from (see :func:`shards.stream.batch_draws`)."""
        return {stream.ALL: stream.entries_from_table(rows)}

    def fingerprints(self) -> dict[str, str]:
        """Fingerprints of the task's own inputs (e.g. a label table), at a fresh start."""
        return {}

    def model_args(self) -> dict[str, Any]:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def init_weights(self, model: nn.Module) -> list[dict[str, Any]]:
        """Load initial weights (fresh start); their init chain, or [] for random init."""
        return []

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        return None

    def loss(self, job: Job, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, job: Job, batches: Iterable[dict[str, Any]]) -> Any:
        raise NotImplementedError

    def summarise(self, parts: list[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self, job: Job) -> dict[str, Any]:
        """After the last epoch, on every rank; extra entries of the summary."""
        return {}


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
    step: int = 0
    best_score: float | None = None
    history: list[dict[str, Any]]


def run(task: Task, progress: Progress | None = None) -> dict[str, Any]:
    """Train (or resume) ``task``'s run; under torchrun every rank calls this.

    Returns:
        ``run``, ``task``, ``step``, ``total_steps``, ``best_metric``, ``best_score``,
        the last epoch's validation figures, and what :meth:`Task.finish` adds.

    Raises:
        ConfigError: empty selection, a RUN that holds a run (``resume="never"``), a
            resume with other settings, or training patients in the held-out rows.
        CheckpointError: ``resume="always"`` without a checkpoint.
    """
    cfg = task.cfg
    env = DistEnv.from_env()
    device = setup_device(env)
    try:
        job = _start(task, env, device, RunDir(cfg.out, writer=env.is_main), progress)
        log.info(
            "training %d steps (%d x %d) from step %d", job.total, cfg.epochs, job.spe, job.step
        )
        for epoch in range(job.step // job.spe, cfg.epochs):
            stats = _train_epoch(job, epoch)
            _end_epoch(job, epoch, stats)
        extra = task.finish(job)
        last = job.history[-1] if job.history else {}
        return {
            "run": job.run.url,
            "task": task.name,
            "step": job.step,
            "total_steps": job.total,
            "best_metric": task.best[0],
            "best_score": job.best_score,
            f"best_{task.best[0]}": job.best_score,
            **{k: v for k, v in last.items() if k.startswith("val_")},
            **extra,
        }
    finally:
        teardown(env)


def _start(
    task: Task, env: DistEnv, device: torch.device, run_dir: RunDir, progress: Progress | None
) -> Job:
    """Resume or start fresh: pinned rows, model, optimizer, schedule, position."""
    cfg = task.cfg
    exists = on_main(env, lambda: run_dir.exists(ckpts.LAST))
    if exists and cfg.resume == "never":
        raise ConfigError(
            f"{run_dir.url} already holds a run: pass --resume auto to continue it, "
            "or choose another --out"
        )
    ckpt = ckpts.load_checkpoint(cfg.out, "last") if exists or cfg.resume == "always" else None
    if ckpt is not None:
        _check_settings(task, env, ckpt, run_dir.url)
    train_rows, val_rows, pinned = on_main(env, lambda: _pin_rows(task, run_dir, ckpt))
    task.use_rows(train_rows, val_rows)
    spe = cfg.steps_per_epoch or train_rows.num_rows // (cfg.batch_size * env.world_size)
    if spe < 1:
        raise ConfigError(
            f"{train_rows.num_rows} training rows give no full batch of {cfg.batch_size} on "
            f"{env.world_size} rank(s): lower --batch-size or pass --steps-per-epoch"
        )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    model = task.build_model()
    chain = ckpt["init"] if ckpt else task.init_weights(model) or [ckpts.random_init(cfg.seed)]
    if device.type == "cuda":
        model = model.to(device, memory_format=torch.channels_last)
    optimizer = task.optimizer(model)
    meta = {
        "task": task.name,
        "model_args": task.model_args(),
        "config": cfg.to_dict(),
        "steps_per_epoch": spe,
        "total_steps": cfg.epochs * spe,
        "world_size": env.world_size,
        "init": chain,
        "best_metric": task.best[0],
        "train_rows": train_rows.num_rows,
        "val_rows": val_rows.num_rows,
        **pinned,
    }
    if ckpt is not None and ckpt.get("model_args") != meta["model_args"]:
        raise ConfigError(
            f"cannot resume {run_dir.url}: its model is {ckpt.get('model_args')}, "
            f"now {meta['model_args']}"
        )
    net = model
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    job = Job(
        cfg=cfg,
        task=task,
        env=env,
        device=device,
        run=run_dir,
        spe=spe,
        total=meta["total_steps"],
        meta=meta,
        train_rows=train_rows,
        val_rows=val_rows,
        val_entries=stream.entries_from_table(val_rows),
        pools=task.pools(train_rows),
        model=model,
        net=net,
        optimizer=optimizer,
        scheduler=task.scheduler(optimizer, meta["total_steps"]),
        progress=progress,
        history=[],
    )
    if ckpt is not None:
        _restore(job, ckpt)
    plan = {k: v for k, v in meta.items() if k != "config"}
    job.run.write_json(CONFIG_FILE, {**meta["config"], **plan})
    return job


def _check_settings(task: Task, env: DistEnv, ckpt: dict[str, Any], url: str) -> None:
    """One line naming every setting that differs from the run's, if any does."""
    old, new = ckpt.get("config", {}), task.cfg.to_dict()
    problems = [] if ckpt.get("task") == task.name else [f"task {ckpt.get('task')}"]
    for key in sorted(set(old) | set(new)):
        if key not in FREE_ON_RESUME and old.get(key) != new.get(key):
            option = "--" + key.replace("_", "-")
            problems.append(f"{option} {old.get(key)!r} (now {new.get(key)!r})")
    if ckpt.get("world_size") != env.world_size:
        problems.append(f"{ckpt.get('world_size')} processes (now {env.world_size})")
    if problems:
        raise ConfigError(
            f"cannot resume {url}: it was trained with " + "; ".join(problems)
            + ". Rerun with the run's settings, or choose another --out"
        )  # fmt: skip


def _pin_rows(
    task: Task, run_dir: RunDir, ckpt: dict[str, Any] | None
) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Rank 0: the run's rows (selected now and stored, or read back) and their record."""
    cfg = task.cfg
    if ckpt is not None:
        if not (run_dir.exists(TRAIN_ROWS) and run_dir.exists(VAL_ROWS)):
            raise ConfigError(f"cannot resume {run_dir.url}: its pinned rows/ are missing")
        train, val = run_dir.get_table(TRAIN_ROWS), run_dir.get_table(VAL_ROWS)
        found = {"train": manifest.fingerprint(train), "val": manifest.fingerprint(val)}
        want = ckpt["fingerprints"]
        if any(found[k] != want.get(k) for k in found):
            raise ConfigError(
                f"cannot resume {run_dir.url}: its rows/ do not match its checkpoint "
                f"(fingerprints {found}, checkpoint {want})"
            )
        return train, val, {"fingerprints": want, "leakage": ckpt["leakage"]}
    train = task.prepare_rows(_select(cfg.dataset, cfg.where, "--where"), train=True)
    val = task.prepare_rows(_select(cfg.dataset, cfg.val_where, "--val-where"), train=False)
    for rows, option, where in ((train, "--where", cfg.where), (val, "--val-where", cfg.val_where)):
        if rows.num_rows == 0:
            raise ConfigError(f"{option} {where!r} selects no usable rows in {cfg.dataset}")
    leakage = leakage_check(cfg, train)
    run_dir.put_table(TRAIN_ROWS, train)
    run_dir.put_table(VAL_ROWS, val)
    fingerprints = {
        "train": manifest.fingerprint(train),
        "val": manifest.fingerprint(val),
        **task.fingerprints(),
    }
    return train, val, {"fingerprints": fingerprints, "leakage": leakage}


def _select(dataset: str, where: str, option: str) -> pa.Table:
    rows = select(dataset, where)
    if rows.num_rows == 0:
        raise ConfigError(f"{option} {where!r} selects no rows in {dataset}")
    return rows


def leakage_check(cfg: RunConfig, train: pa.Table) -> dict[str, Any]:
    """Refuse training patients that are in the SIIM val/test rows; what was found.

    Returns:
        ``held_out_where``, ``held_out_patients``, ``overlap_patients`` (training patients
        among them), ``allow_overlap``, and ``nih_patients_excluded``: the NIH patients who
        are SIIM val/test patients, whom the unified split keeps out of NIH's train split.

    Raises:
        ConfigError: an overlap without ``cfg.allow_overlap``.
    """
    store = open_store(cfg.dataset, create=False)
    held = manifest.read(store, HELD_OUT_WHERE, columns=["patient_key"])
    nih = manifest.read(store, "dataset == 'nih'", columns=["patient_key"])
    held_patients = set(held.column("patient_key").to_pylist()) - {None}
    overlap = held_out_overlap(train, held)
    info = {
        "held_out_where": HELD_OUT_WHERE,
        "held_out_patients": len(held_patients),
        "nih_patients_excluded": len(set(nih.column("patient_key").to_pylist()) & held_patients),
        "overlap_patients": len(overlap),
        "allow_overlap": cfg.allow_overlap,
    }
    if overlap and not cfg.allow_overlap:
        raise ConfigError(
            f"{len(overlap)} patient(s) of the training rows (--where {cfg.where!r}) are also "
            f"in the SIIM val/test rows ({HELD_OUT_WHERE}), so their SIIM scores would leak: "
            "select only the train split of a dataset whose SIIM rows were ingested with "
            "--nih-xref (one split per patient), or pass --allow-overlap to train anyway"
        )
    if overlap:
        log.warning(
            "--allow-overlap: %d training patients are SIIM val/test patients", len(overlap)
        )
    return info


def _restore(job: Job, ckpt: dict[str, Any]) -> None:
    """Weights, optimizer, schedule, RNG, position and history of ``last.pt``."""
    job.model.load_state_dict(ckpt["model"])
    job.optimizer.load_state_dict(ckpt["optimizer"])
    if job.scheduler is not None:
        job.scheduler.load_state_dict(ckpt["scheduler"])
    ckpts.set_rng_state(ckpt["rng"])
    job.step = int(ckpt["step"])
    job.best_score = ckpt.get("best_score")
    # Epochs after the checkpoint's are redone: drop their lines, keep the earlier ones.
    job.history = [r for r in job.run.metrics() if r["epoch"] < job.step // job.spe]
    log.info("resuming %s at step %d (epoch %d)", job.run.url, job.step, job.step // job.spe)


def _train_epoch(job: Job, epoch: int) -> dict[str, Any]:
    """The rest of ``epoch``: exactly the same number of steps on every rank."""
    cfg, env = job.cfg, job.env
    job.model.train()
    started, first = time.perf_counter(), job.step
    loss_sum = torch.zeros((), device=job.device)
    batches = train_batches(
        job.task.loader(train=True),
        rank=env.rank,
        world_size=env.world_size,
        epoch=epoch,
        steps_per_epoch=job.spe,
        total_steps=job.total,
        start_step=job.step - epoch * job.spe,
        pools=job.pools,
    )
    for batch in islice(batches, (epoch + 1) * job.spe - job.step):
        loss_sum += _train_step(job, batch)
        job.step += 1
        end_of_epoch = job.step == (epoch + 1) * job.spe
        if env.is_main and job.step % cfg.checkpoint_every == 0 and not end_of_epoch:
            job.run.put(ckpts.LAST, _checkpoint(job, {}))
        if job.progress and env.is_main:
            done, seconds = job.step - first, time.perf_counter() - started
            job.progress({
                "event": "step", "step": job.step, "total": job.total, "epoch": epoch,
                "epochs": cfg.epochs, "loss": float(loss_sum) / done,
                "images_per_s": done * cfg.batch_size * env.world_size / seconds,
            })  # fmt: skip
    if job.step != (epoch + 1) * job.spe:  # fail now: a short rank would hang the others
        raise TrainingError(
            f"rank {env.rank} got {job.step - first} batches in epoch {epoch}, expected "
            f"{(epoch + 1) * job.spe - first}: the training stream ran short"
        )
    return {"batches": job.step - first, "seconds": time.perf_counter() - started, "loss": loss_sum}


def _train_step(job: Job, batch: dict[str, Any]) -> torch.Tensor:
    with autocast(job.device, job.cfg.amp):
        loss = job.task.loss(job, batch)
    job.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    job.optimizer.step()
    if job.scheduler is not None and job.task.schedule_on == "step":
        job.scheduler.step()
    return loss.detach()


def validate(job: Job) -> dict[str, Any]:
    """The task's validation figures over the pinned val rows, the same on every rank."""
    broadcast_state(job.env, job.model)  # evaluate exactly the weights the checkpoint holds
    batches = eval_batches(
        job.task.loader(train=False),
        rank=job.env.rank,
        world_size=job.env.world_size,
        entries=job.val_entries,
    )
    job.model.eval()
    with torch.no_grad(), autocast(job.device, job.cfg.amp):
        part = job.task.validate(job, batches)
    job.model.train()
    return job.task.summarise(gather(job.env, part))


def _end_epoch(job: Job, epoch: int, stats: dict[str, Any]) -> None:
    """Validate, step a plateau schedule, log a metrics line, write the checkpoints."""
    env, cfg, task = job.env, job.cfg, job.task
    sums = torch.stack([stats["loss"], torch.tensor(float(stats["batches"])).to(job.device)])
    if env.distributed:
        dist.all_reduce(sums)
    val = validate(job)
    lr = job.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
    row = {
        "epoch": epoch,
        "step": job.step,
        "lr": lr,
        "lr_per_rank": gather(env, lr),
        "train_loss": float(sums[0] / sums[1]) if sums[1] else float("nan"),
        "images_per_s": stats["batches"] * cfg.batch_size * env.world_size / stats["seconds"],
        "batches_per_rank": gather(env, stats["batches"]),
        "time_s": stats["seconds"],
        **{f"val_{k}": v for k, v in val.items()},
    }
    if job.scheduler is not None and task.schedule_on == "val_loss":
        job.scheduler.step(row["val_loss"])  # the all-reduced loss: every rank steps alike
    job.history.append(row)
    job.run.write_metrics(job.history, task.panels, title=_title(job))
    metric, mode = task.best
    score = row[metric]
    improved = score == score and (
        job.best_score is None
        or (score > job.best_score if mode == "max" else score < job.best_score)
    )
    if improved:
        job.best_score = score
    if env.is_main:
        job.run.put(ckpts.LAST, _checkpoint(job, row))
        if improved:  # for inference only: no optimizer state, a third of the size
            job.run.put(ckpts.BEST, _checkpoint(job, row, resumable=False))
    if job.progress and env.is_main:
        job.progress({"event": "epoch", "epochs": cfg.epochs, "headline": task.headline, **row})
    log.info("epoch %d: %s", epoch, ", ".join(f"{k} {row.get(k)}" for k in task.headline))


def _title(job: Job) -> str:
    name = job.run.url.rstrip("/").rsplit("/", 1)[-1]
    return f"{name} ({job.task.name}, {job.cfg.size} px, step {job.step}/{job.total})"


def _checkpoint(job: Job, val: dict[str, Any], *, resumable: bool = True) -> bytes:
    ckpt = {
        "format": ckpts.FORMAT,
        **job.meta,
        "model": job.model.state_dict(),
        "step": job.step,
        "epoch": job.step // job.spe,
        "best_score": job.best_score,
        "val": val,
        "versions": ckpts.versions(),
    }
    if resumable:
        ckpt["optimizer"] = job.optimizer.state_dict()
        if job.scheduler is not None:
            ckpt["scheduler"] = job.scheduler.state_dict()
        ckpt["rng"] = ckpts.rng_state()
    return ckpts.to_bytes(ckpt)
