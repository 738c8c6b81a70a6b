"""The one training loop every task shares (nanoGPT's loop, with tasks plugged in).

A task file (``training/segment.py``, ``training/classify.py``, ...) holds a config (a
:class:`pneumo.training.task.RunConfig` subclass) and a :class:`pneumo.training.task.Task`
that owns only its model, its step, its validation metrics and its optimizer; :func:`run`
owns everything else, the same way for every task:

1. the process group and device (torchrun: NCCL on GPU, gloo on CPU); only rank 0 writes;
2. resume (``cfg.resume``): ``auto`` continues from ``RUN/checkpoints/last.pt`` when there
   is one and starts fresh otherwise, ``never`` refuses a RUN that holds a checkpoint,
   ``always`` needs one. A resume refuses, in one line, every setting that shapes the stream
   or the model and differs from the run's (dataset, where, size, batch size, workers,
   seed, sampling, model, encoder init, world size...): only :data:`FREE_ON_RESUME` may change;
3. the pinned rows (:mod:`pneumo.training.rows`): on a fresh start rank 0 selects ``cfg.where``
   and ``cfg.val_where`` once, the task filters them (``Task.prepare_rows``), and they are
   stored as ``RUN/rows/{train,val}.parquet`` and sent to every rank; a resumed run reads
   them back and checks their fingerprints against the checkpoint. A batch committed to
   the dataset during training changes nothing in the run;
4. the leakage guard (fresh start, :func:`pneumo.training.rows.leakage_check`): no
   ``patient_key`` of the training rows may be in the SIIM val/test rows unless
   ``allow_overlap``; what it found (and how many NIH patients the unified split keeps
   out) is recorded in ``config.json`` and every checkpoint;
5. the model, built after seeding torch with ``cfg.seed`` (the same weights on every rank),
   its initial weights (``Task.init_weights``: the init chain), DDP, the optimizer and
   the schedule;
6. per epoch: exactly ``steps_per_epoch`` batches on every rank (DDP hangs otherwise);
   ``last.pt`` every ``checkpoint_every`` steps, and at the step reached when Ctrl-C or
   SIGTERM stops the run (a step under way is finished first; the temp files of a
   checkpoint write that a kill cut short are removed at the next start); when
   ``cfg.precise_bn`` is set, the BatchNorm running statistics re-estimated for the
   epoch's final weights (:func:`precise_bn`); validation on the plain module, never the
   DDP wrapper (ranks hold different numbers of validation batches), each rank's part
   gathered so every rank computes the same figures (a plateau schedule steps the same on
   every rank); a line in ``metrics.jsonl``, ``curves.png``, ``last.pt``, and ``best.pt``
   when ``Task.best`` improved;
7. ``Task.finish`` (segment: the post-processing search), then the summary.

With MLflow tracking on (:mod:`pneumo.training.tracking`), rank 0 logs the run there: its
config at the start, each epoch's metrics line and curves, the RUN's files at the end.

On GPU: autocast to ``cfg.precision`` (bf16 by default; fp16 with a gradient scaler, whose
state every resumable checkpoint holds; fp32: none) around the step, PreciseBN and the
validation, channels-last images (:func:`pneumo.training.runs.images_to`), pinned memory,
cuDNN autotune; ``cfg.compile``: the training step calls ``torch.compile`` of the model (of
the DDP wrapper, when distributed). On CPU everything runs in float32.

Loader workers (:class:`pneumo.training.data.RunLoader`): one set per rank for the whole run,
serving every epoch's batches, PreciseBN's and the validation's; ``cfg.workers`` unset
takes the run's own on a resume, else :func:`pneumo.training.runs.default_workers`.

Progress: ``progress`` (rank 0) gets ``{"event": "step", "step", "total", "epoch",
"epochs"}`` after every step, with ``"loss"`` (the mean training loss of the ``loss_steps``
steps since the last reading) and ``"images_per_s"`` (over those steps) added every
``log_every`` steps and at the epoch's last step: the losses add up on the device, and only
those readings wait for it (:func:`pneumo.training.task.default_log_every`). After every
epoch it gets ``{"event": "epoch", "epochs", "headline", **metrics line}``.

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
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pneumo.shards import manifest, stream
from pneumo.shards.errors import ConfigError, PneumoError
from pneumo.shards.store import open_store
from pneumo.training import checkpoint as ckpts
from pneumo.training import tracking
from pneumo.training.data import RunLoader
from pneumo.training.rows import pin_rows
from pneumo.training.runs import (
    CONFIG_FILE,
    DistEnv,
    RunDir,
    autocast,
    available_cpus,
    broadcast_state,
    default_workers,
    gather,
    grad_scaler,
    on_main,
    setup_device,
    signals_held,
    teardown,
)
from pneumo.training.task import Task, default_log_every

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
# The training-loss readings (every log_every steps, rank 0, when progress is reported):
# rewritten with each last.pt (stores have no append), so a resume keeps those of its steps.
STEPS_FILE = "steps.jsonl"
# Settings that change nothing a run computes: a resumed run may differ in them. compile
# changes how the step's kernels are made, not what they compute (up to float rounding,
# as another GPU would).
FREE_ON_RESUME = frozenset(
    {"out", "resume", "checkpoint_every", "log_every", "compile", "cache_dir", "cache_limit"}
)
# Settings that, unset, take the run's own value on a resume. The loader workers (and the
# number of processes) may also change: the resumed run trains the planned steps on its
# layout (pneumo.shards.elastic).
RUN_DECIDES = frozenset({"workers"})
# Settings added after runs were written, with the value those runs had: a run from before
# resumes without naming them.
ADDED_SETTINGS = {"train_fraction": 1.0}


class TrainingError(PneumoError):
    """Training cannot go on (e.g. the data stream delivered fewer batches than planned)."""


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
        # Refuse a DATASET that is not one before RUN is created (nothing left behind).
        manifest.require_dataset(open_store(cfg.dataset, create=False))
        job = _start(task, env, device, RunDir(cfg.out, writer=env.is_main), progress)
        log.info(
            "training %d steps (%d x %d) from step %d", job.total, cfg.epochs, job.spe, job.step
        )
        # The MLflow run (rank 0, with tracking on) ends FINISHED, FAILED or KILLED here too.
        with closing(job.loader), tracking.training_run(job) as tracked:
            for epoch in range(job.step // job.spe, cfg.epochs):
                stats = _train_epoch(job, epoch)
                _end_epoch(job, epoch, stats)
                tracked.epoch(job.history[-1])
            extra = task.finish(job)
            tracked.finish({f"best_{task.best[0]}": job.best_score, **extra})
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
    run_dir.clean_incomplete()
    ckpt = _resume_point(task, env, run_dir)
    task.cfg = cfg = _settled(task.cfg, env, ckpt)
    train_rows, val_rows, pinned = on_main(env, lambda: pin_rows(task, run_dir, ckpt))
    task.use_rows(train_rows, val_rows)
    plan = _plan_of(ckpt) if ckpt else {"world_size": env.world_size, "workers": cfg.workers}
    plan["workers"] = max(plan["workers"], 1)
    spe = cfg.steps_per_epoch or train_rows.num_rows // (cfg.batch_size * plan["world_size"])
    if ckpt is not None:
        spe = int(ckpt["steps_per_epoch"])  # the plan's, whatever the layout now
        if "plan" not in ckpt and int(ckpt["step"]) % spe:
            log.warning(
                "%s was saved mid-epoch by a pneumo whose stream read whole shards; the rest "
                "of epoch %d is drawn in pieces (pneumo.shards.slots), so it may repeat or "
                "miss a few of that epoch's samples; later epochs are whole passes",
                run_dir.store.url_of(ckpts.LAST), int(ckpt["step"]) // spe,
            )  # fmt: skip
    if spe < 1:
        raise ConfigError(
            f"{train_rows.num_rows} training rows give no full batch of {cfg.batch_size} on "
            f"{env.world_size} rank(s): lower --batch-size or pass --steps-per-epoch"
        )
    if ckpt is not None and ckpt.get("model_args") != task.model_args():
        raise ConfigError(
            f"cannot resume {run_dir.url}: its model is {ckpt.get('model_args')}, "
            f"now {task.model_args()}"
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
        "plan": plan,  # the layout that decides each step's samples
        "layouts": _layouts(ckpt, env, cfg.workers),
        "init": chain,
        "best_metric": task.best[0],
        "train_rows": train_rows.num_rows,
        "val_rows": val_rows.num_rows,
        **pinned,
    }
    pools = task.pools(train_rows)
    val_entries = stream.entries_from_table(val_rows)
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
        val_entries=val_entries,
        pools=pools,
        model=model,
        net=_step_module(model, env, device, compile=cfg.compile),
        optimizer=optimizer,
        scheduler=task.scheduler(optimizer, meta["total_steps"]),
        progress=progress,
        loader=RunLoader(
            task.loader(train=True),
            task.loader(train=False),
            rank=env.rank,
            world_size=env.world_size,
            steps_per_epoch=spe,
            total_steps=meta["total_steps"],
            planned=(plan["world_size"], plan["workers"]),
            pools=pools,
            val_entries=val_entries,
        ),
        scaler=grad_scaler(device, cfg.precision),
        log_every=cfg.log_every or default_log_every(cfg.batch_size, env.world_size),
        history=[],
    )
    if ckpt is not None:
        _restore(job, ckpt)
    about = {k: v for k, v in meta.items() if k != "config"}  # task, steps, init chain, rows
    job.run.write_json(CONFIG_FILE, {**meta["config"], **about})
    return job


def _step_module(
    model: nn.Module, env: DistEnv, device: torch.device, *, compile: bool
) -> nn.Module:
    """What the training step calls: ``model``, DDP-wrapped when distributed, compiled
    when asked (checkpoints, PreciseBN and validation use the plain ``model``)."""
    net = model
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    return torch.compile(net) if compile else net


def _settled(cfg: Any, env: DistEnv, ckpt: dict[str, Any] | None) -> Any:
    """``cfg`` with its unset loader workers decided: the run's own on a resume, else from
    the CPUs, rank 0's count on every rank (the stream of every rank depends on it)."""
    if cfg.workers is not None:
        return cfg
    if ckpt is not None:
        workers = int(ckpt["config"]["workers"])
    else:
        workers = on_main(env, lambda: default_workers(available_cpus(), env.local_world_size))
        log.info("%d loader workers per process (--workers to choose)", workers)
    return replace(cfg, workers=workers)


def _resume_point(task: Task, env: DistEnv, run_dir: RunDir) -> dict[str, Any] | None:
    """``last.pt`` to resume from (checked against the settings), or None: start fresh."""
    cfg = task.cfg
    exists = on_main(env, lambda: run_dir.exists(ckpts.LAST))
    if exists and cfg.resume == "never":
        raise ConfigError(
            f"{run_dir.url} already holds a run: pass --resume auto to continue it, "
            "or choose another --out"
        )
    if not exists and cfg.resume != "always":
        return None
    ckpt = ckpts.load_checkpoint(cfg.out, "last")  # "always" without one: the error says so
    _check_settings(task, env, ckpt, run_dir.url)
    return ckpt


def _check_settings(task: Task, env: DistEnv, ckpt: dict[str, Any], url: str) -> None:
    """One line naming every setting that differs from the run's, if any does."""
    old, new = _comparable(ckpt.get("config", {})), _comparable(task.cfg.to_dict())
    problems = [] if ckpt.get("task") == task.name else [f"task {ckpt.get('task')}"]
    for key in sorted(set(old) | set(new)):
        if key in FREE_ON_RESUME or key in RUN_DECIDES:
            continue
        if old.get(key) != new.get(key):
            option = "--" + key.replace("_", "-")
            problems.append(f"{option} {old.get(key)!r} (now {new.get(key)!r})")
    plan = _plan_of(ckpt)
    step_images = plan["world_size"] * task.cfg.batch_size
    if step_images % env.world_size:
        problems.append(
            f"{plan['world_size']} processes x {task.cfg.batch_size} images a step, which "
            f"{env.world_size} processes cannot share evenly (a divisor of {step_images})"
        )
    if problems:
        raise ConfigError(
            f"cannot resume {url}: it was trained with " + "; ".join(problems)
            + ". Rerun with the run's settings, or choose another --out"
        )  # fmt: skip


def _plan_of(ckpt: dict[str, Any]) -> dict[str, int]:
    """The layout a run was planned with: processes and stream workers (runs from before
    elastic resumes have only ``world_size`` and their config's workers)."""
    if "plan" in ckpt:
        return dict(ckpt["plan"])
    return {"world_size": int(ckpt["world_size"]),
            "workers": max(int(ckpt["config"]["workers"]), 1)}  # fmt: skip


def _layouts(ckpt: dict[str, Any] | None, env: DistEnv, workers: int) -> list[dict[str, int]]:
    """Each layout the run has trained on, from the step it began: the run's list, with
    this one added when it differs from the last."""
    now = {"world_size": env.world_size, "workers": max(workers, 1)}
    if ckpt is None:
        return [{"step": 0, **now}]
    layouts = list(ckpt.get("layouts") or [{"step": 0, **_plan_of(ckpt)}])
    last = layouts[-1]
    if (last["world_size"], last["workers"]) != (now["world_size"], now["workers"]):
        layouts.append({"step": int(ckpt["step"]), **now})
        log.warning(
            "resuming on %d process(es) x %d loader worker(s), planned on %d x %d: each step "
            "trains the planned samples, split over this layout",
            now["world_size"], now["workers"], layouts[0]["world_size"], layouts[0]["workers"],
        )  # fmt: skip
    return layouts


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config as today's say it: one written before ``precision`` has ``amp`` alone
    (bf16 when true); ``amp`` follows precision, so it is not compared itself."""
    config = {**ADDED_SETTINGS, **config}
    amp = config.pop("amp", True)
    if config.get("precision") is None:
        config["precision"] = "bf16" if amp else "fp32"
    return config


def _restore(job: Job, ckpt: dict[str, Any]) -> None:
    """Weights, optimizer, schedule, RNG, position and history of ``last.pt`` (a finished
    run's holds the weights alone: nothing is left to train)."""
    job.model.load_state_dict(ckpt["model"])
    job.step = job.saved_step = int(ckpt["step"])
    if job.step < job.total:
        job.optimizer.load_state_dict(ckpt["optimizer"])
        if job.scheduler is not None:
            job.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):  # fp16 on GPU: the loss scale and its growth count
            job.scaler.load_state_dict(ckpt["scaler"])
        ckpts.set_rng_state(ckpt["rng"])
    job.best_score = ckpt.get("best_score")
    if job.run.store.exists(STEPS_FILE):  # the readings of the steps kept
        lines = job.run.store.get(STEPS_FILE).decode().splitlines()
        job.readings = [r for r in map(json.loads, lines) if r["step"] <= job.step]
    # Epochs after the checkpoint's are redone: drop their lines, keep the earlier ones.
    job.history = [r for r in job.run.metrics() if r["epoch"] < job.step // job.spe]
    log.info("resuming %s at step %d (epoch %d)", job.run.url, job.step, job.step // job.spe)


def _train_epoch(job: Job, epoch: int) -> dict[str, Any]:
    """The rest of ``epoch``: exactly the same number of steps on every rank.

    Ctrl-C or SIGTERM (a preempted pod) waits for the step under way, stops the loader
    workers and saves ``last.pt`` at that step, so the rerun loses no finished step.
    """
    cfg, env = job.cfg, job.env
    job.model.train()
    started, first = time.perf_counter(), job.step
    loss_sum = torch.zeros((), device=job.device)  # summed on the device: no sync a step
    report = _StepReport(job, epoch, job.progress) if job.progress and env.is_main else None
    batches = _epoch_batches(job, epoch, start_step=job.step - epoch * job.spe)
    try:
        with closing(batches):
            for batch in islice(batches, (epoch + 1) * job.spe - job.step):
                with signals_held():
                    loss = _train_step(job, batch)
                    loss_sum += loss
                    job.step += 1
                    if job.step % cfg.checkpoint_every == 0 and job.step % job.spe:
                        _save_last(job)  # the epoch's end writes its own, validated
                if report is not None:
                    report.step(loss)
    except KeyboardInterrupt:
        # The loader workers stop now, not at interpreter exit (where a worker killed by
        # the Ctrl-C can leave the exit waiting).
        if job.loader is not None:
            job.loader.close()
        # Not at the epoch's last step: last.pt there would skip the epoch's validation.
        if job.step % job.spe and job.step != job.saved_step:
            with signals_held():
                _save_last(job)
            log.info("saved step %d in %s", job.step, job.run.store.url_of(ckpts.LAST))
        raise
    if job.step != (epoch + 1) * job.spe:  # fail now: a short rank would hang the others
        raise TrainingError(
            f"rank {env.rank} got {job.step - first} batches in epoch {epoch}, expected "
            f"{(epoch + 1) * job.spe - first}: the training stream ran short"
        )
    return {"batches": job.step - first, "seconds": time.perf_counter() - started, "loss": loss_sum}


class _StepReport:
    """The step events of an epoch (rank 0, with a progress callback): the position after
    every step; the mean loss of the steps since the last reading every ``job.log_every``
    steps and at the epoch's last step. Only a reading waits for the device (``float`` of
    the loss sum): the steps in between queue their work and go on."""

    def __init__(self, job: Job, epoch: int, progress: Progress) -> None:
        self.job, self.epoch, self.progress = job, epoch, progress
        self.loss_sum = torch.zeros((), device=job.device)
        self.steps, self.since = 0, time.perf_counter()

    def step(self, loss: torch.Tensor) -> None:
        job = self.job
        self.loss_sum += loss
        self.steps += 1
        event = {
            "event": "step", "step": job.step, "total": job.total, "epoch": self.epoch,
            "epochs": job.cfg.epochs,
        }  # fmt: skip
        if job.step % job.log_every == 0 or job.step == (self.epoch + 1) * job.spe:
            event["loss"] = float(self.loss_sum) / self.steps  # the reading: one sync
            now = time.perf_counter()  # after it: the steps are done, not just queued
            images = self.steps * job.step_images
            event["loss_steps"] = self.steps
            event["images_per_s"] = images / max(now - self.since, 1e-9)
            job.readings.append({
                "step": job.step, "epoch": self.epoch, "loss": event["loss"],
                "loss_steps": self.steps, "images_per_s": event["images_per_s"],
                "lr": job.optimizer.param_groups[0]["lr"],
            })  # fmt: skip
            self.loss_sum.zero_()
            self.steps, self.since = 0, now
        self.progress(event)


def _save_last(job: Job, val: dict[str, Any] | None = None, *, resumable: bool = True) -> None:
    """``last.pt`` at the current step (rank 0 writes; the other ranks note the step)."""
    if job.env.is_main:
        job.run.put(ckpts.LAST, _checkpoint(job, val or {}, resumable=resumable))
        if job.readings:  # the readings up to this step: what a resume starts from
            rows = "".join(json.dumps(r, sort_keys=True) + "\n" for r in job.readings)
            job.run.put(STEPS_FILE, rows.encode())
    job.saved_step = job.step


def _epoch_batches(job: Job, epoch: int, *, start_step: int) -> Iterator[dict[str, Any]]:
    """This rank's training batches of ``epoch`` from its step ``start_step`` on."""
    return _loader(job).train(epoch, start_step)


def val_batches(job: Job) -> Iterator[dict[str, Any]]:
    """This rank's share of the pinned validation rows, from the run's loader workers."""
    return _loader(job).val()


def _loader(job: Job) -> RunLoader:
    if job.loader is None:
        raise TrainingError("this Job has no loader: only loop.run makes one")
    return job.loader


def _train_step(job: Job, batch: dict[str, Any]) -> torch.Tensor:
    with autocast(job.device, job.cfg.precision):
        loss = job.task.loss(job, batch)
    job.optimizer.zero_grad(set_to_none=True)
    # Disabled (all but fp16 on GPU), the scaler is a plain backward and optimizer step.
    job.scaler.scale(loss).backward()
    job.scaler.step(job.optimizer)  # fp16: skipped when the gradients overflowed
    job.scaler.update()
    if job.scheduler is not None and job.task.schedule_on == "step":
        job.scheduler.step()
    return loss.detach()


def precise_bn(job: Job, epoch: int) -> None:
    """Re-estimate every BatchNorm's running statistics for the current weights (PreciseBN).

    Running statistics are an exponential average (momentum 0.1) of batch statistics taken
    while the weights moved: after a short run, or with a large learning rate, they lag the
    weights, and eval-mode outputs (validation, every checkpoint's use) suffer; a classifier
    can then give every validation image one class while the same weights in train mode are
    right. Here they are replaced by the plain average over the first ``cfg.precise_bn``
    training batches of ``epoch``, forwarded in train mode without gradients: the same
    batches (each sample's seed fixes its augmentation) whether or not the epoch was
    resumed, and the global RNG is left as it was. Each rank estimates on its own batches;
    validation then gives every rank rank 0's statistics, which the checkpoints hold.
    """
    count = min(job.cfg.precise_bn, job.spe)
    norms = [
        m
        for m in job.model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if count < 1 or not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    batches = _epoch_batches(job, epoch, start_step=0)
    plain = replace(job, net=job.model)  # no DDP: no collective in these forwards
    devices = [job.device] if job.device.type == "cuda" else []
    job.model.train()
    with closing(batches), torch.random.fork_rng(devices=devices), torch.no_grad():
        for batch in islice(batches, count):
            with autocast(job.device, job.cfg.precision):
                job.task.loss(plain, batch)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def validate(job: Job) -> dict[str, Any]:
    """The task's validation figures over the pinned val rows, the same on every rank."""
    broadcast_state(job.env, job.model)  # evaluate exactly the weights the checkpoint holds
    batches = val_batches(job)
    job.model.eval()
    with closing(batches), torch.no_grad(), autocast(job.device, job.cfg.precision):
        part = job.task.validate(job, batches)
    job.model.train()
    return job.task.summarise(gather(job.env, part))


def _end_epoch(job: Job, epoch: int, stats: dict[str, Any]) -> None:
    """Validate, step a plateau schedule, log a metrics line, write the checkpoints."""
    env, cfg, task = job.env, job.cfg, job.task
    sums = torch.stack([stats["loss"], torch.tensor(float(stats["batches"])).to(job.device)])
    if env.distributed:
        dist.all_reduce(sums)
    precise_bn(job, epoch)
    val = validate(job)
    lr = job.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
    row = {
        "epoch": epoch,
        "step": job.step,
        "lr": lr,
        "lr_per_rank": gather(env, lr),
        "train_loss": float(sums[0] / sums[1]) if sums[1] else float("nan"),
        "images_per_s": stats["batches"] * job.step_images / stats["seconds"],
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
    # best.pt first: a kill between the two leaves last.pt at the epoch before, which the
    # resume redoes (Ctrl-C and SIGTERM wait for both). best.pt is for inference only: no
    # optimizer state, a third of the size. So is the last epoch's last.pt: a finished run
    # cannot go on (--epochs is fixed on resume).
    with signals_held():
        if improved and env.is_main:
            job.run.put(ckpts.BEST, _checkpoint(job, row, resumable=False))
        _save_last(job, row, resumable=job.step < job.total)
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
        if job.scaler.is_enabled():
            ckpt["scaler"] = job.scaler.state_dict()
        ckpt["rng"] = ckpts.rng_state()
    return ckpts.to_bytes(ckpt)
