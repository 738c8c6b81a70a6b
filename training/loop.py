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
   seed, sampling, model, encoder init, world size...): only
   :data:`pneumo.training.start.FREE_ON_RESUME` may change;
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

With MLflow tracking on (:mod:`pneumo.training.tracking`), rank 0 logs the run there
(:func:`pneumo.training.tracked.training_run`): its config at the start, each epoch's
metrics line and curves, the RUN's files at the end.

On GPU: autocast to ``cfg.precision`` (bf16 by default; fp16 with a gradient scaler, whose
state every resumable checkpoint holds; fp32: none) around the step, PreciseBN and the
validation, channels-last images (:func:`pneumo.training.runs.images_to`), pinned memory,
cuDNN autotune; ``cfg.compile``: the training step calls ``torch.compile`` of the model (of
the DDP wrapper, when distributed). On CPU everything runs in float32.

Loader workers (:class:`pneumo.training.run_loader.RunLoader`): one set per rank for the
whole run, serving every epoch's batches, PreciseBN's and the validation's; ``cfg.workers``
unset takes the run's own on a resume, else :func:`pneumo.training.runs.default_workers`.

Progress: ``progress`` (rank 0) gets ``{"event": "step", "step", "total", "epoch",
"epochs"}`` after every step, with ``"loss"`` (the mean training loss of the ``loss_steps``
steps since the last reading) and ``"images_per_s"`` (over those steps) added every
``log_every`` steps and at the epoch's last step: the losses add up on the device, and only
those readings wait for it (:func:`pneumo.training.task.default_log_every`). After every
epoch it gets ``{"event": "epoch", "epochs", "headline", **metrics line}``.

How to write a task: :mod:`pneumo.training.task`. The start of a run, fresh or resumed
(points 2 to 5): :mod:`pneumo.training.start`; the :class:`pneumo.training.job.Job` it
makes is what the loop and a task's hooks share.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pneumo.shards import manifest
from pneumo.shards.errors import PneumoError
from pneumo.shards.store import open_store
from pneumo.training import checkpoint as ckpts
from pneumo.training.job import STEPS_FILE, Job, Progress
from pneumo.training.run_loader import RunLoader
from pneumo.training.runs import (
    DistEnv,
    RunDir,
    autocast,
    broadcast_state,
    gather,
    setup_device,
    signals_held,
    teardown,
)
from pneumo.training.start import start_job
from pneumo.training.task import Task
from pneumo.training.tracked import training_run

log = logging.getLogger(__name__)


class TrainingError(PneumoError):
    """Training cannot go on (e.g. the data stream delivered fewer batches than planned)."""


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
        job = start_job(task, env, device, RunDir(cfg.out, writer=env.is_main), progress)
        log.info(
            "training %d steps (%d x %d) from step %d", job.total, cfg.epochs, job.spe, job.step
        )
        # The MLflow run (rank 0, with tracking on) ends FINISHED, FAILED or KILLED here too.
        with closing(job.loader), training_run(job) as tracked:
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
