"""``pneumo train segment``: a U-Net/ResNet-34 on streamed SIIM shards, read top to bottom.

The flow of :func:`train_segment`:

1. join the torchrun process group, if any (NCCL on GPU, gloo on CPU); only rank 0 writes;
2. select the training rows in the manifest; their fingerprint goes into every checkpoint;
3. build the U-Net (offline: optional encoder weights from a file/object you name), Adam
   and the learning-rate schedule: linear warm-up over ``warmup_steps``, then cosine decay
   to 10% of ``lr`` at the last step (nanoGPT's schedule);
4. resume from ``RUN/checkpoints/last.pt`` when asked: weights, optimizer, schedule, RNG
   states, step, and the stream position (epoch, step within it);
5. per epoch: exactly ``steps_per_epoch`` batches on every rank (DDP hangs otherwise),
   ``checkpoints/last.pt`` every ``checkpoint_every`` steps, then validation on the val
   split (SIIM Dice at probability 0.5, the official per-image mean), a line in
   ``metrics.jsonl``, ``curves.png``, ``last.pt`` and ``best.pt`` (by val Dice);
6. at the end, the SIIM 1st-place post-processing triplet is chosen on the val split with
   the best weights and stored as ``postprocess.json`` for ``pneumo evaluate``/``predict``.

On GPU: bf16 autocast (``amp``), channels-last tensors, non-blocking copies, cuDNN autotune.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shards import manifest
from shards.errors import ConfigError, PneumoError
from training import checkpoint as ckpts
from training import fullres
from training.data import LoaderConfig, eval_batches, select, train_batches
from training.losses import DICE_WEIGHT, FOCAL_WEIGHT, FocalDiceLoss
from training.metrics import PostProcess, dice_from_counts, overlap_counts, siim_summary
from training.model import build_unet, load_encoder_weights
from training.runs import (
    CONFIG_FILE,
    POSTPROCESS_FILE,
    DistEnv,
    RunDir,
    autocast,
    broadcast_state,
    gather,
    images_to,
    setup_device,
    teardown,
)

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


class TrainingError(PneumoError):
    """Training cannot go on (e.g. the data stream delivered fewer batches than planned)."""


@dataclass(frozen=True, kw_only=True)
class SegmentConfig:
    """Everything a segmentation run depends on; stored whole in config.json and checkpoints.

    Attributes:
        dataset: the DATASET (folder or s3://) holding shards and manifest.
        out: the RUN (folder or s3://) for checkpoints, metrics and plots.
        where: manifest filter of the training rows.
        val_where: manifest filter of the validation rows.
        size: square input side in pixels (the report: 512).
        batch_size: images per step per rank (the report: 8).
        lr: Adam's peak learning rate (the report: 1e-4).
        warmup_steps: linear warm-up steps before the cosine decay.
        epochs: passes of ``steps_per_epoch`` steps.
        steps_per_epoch: None: training rows // (batch_size x world size).
        workers: loader processes per rank.
        encoder: smp encoder name.
        encoder_init: file or s3:// object with ResNet weights for the encoder (None: random).
        pos_rate: positive share of training batches, sliding linearly from the first value
            to the second over the run (SIIM 1st place: 0.8 -> 0.4); None: the natural rate.
        seed: seeds model init, sampling and augmentation.
        resume: continue the run in ``out`` from its last checkpoint.
        in_channels: image channels (1: grey).
        focal_weight, dice_weight: loss weights (see training.losses).
        checkpoint_every: steps between ``last.pt`` writes (also written at each epoch end).
        amp: bf16 autocast on GPU (ignored on CPU).
    """

    dataset: str
    out: str
    where: str = "dataset == 'siim' and split == 'train' and has_ptx is not None"
    val_where: str = "dataset == 'siim' and split == 'val' and has_ptx is not None"
    size: int = 512
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 100
    epochs: int = 10
    steps_per_epoch: int | None = None
    workers: int = 2
    encoder: str = "resnet34"
    encoder_init: str | None = None
    pos_rate: tuple[float, float] | None = (0.8, 0.4)
    seed: int = 0
    resume: bool = False
    in_channels: int = 1
    focal_weight: float = FOCAL_WEIGHT
    dice_weight: float = DICE_WEIGHT
    checkpoint_every: int = 500
    amp: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be at least 1, got {self.steps_per_epoch}")
        if self.size % 32:
            raise ConfigError(f"size must be a multiple of 32 (U-Net strides), got {self.size}")
        if not self.lr > 0 or self.warmup_steps < 0:
            raise ConfigError("lr must be > 0 and warmup_steps >= 0")
        self.loader(train=True)  # the loader's own checks: batch size, workers, pos_rate...
        try:
            FocalDiceLoss(focal_weight=self.focal_weight, dice_weight=self.dice_weight)
        except ValueError as e:
            raise ConfigError(f"focal_weight / dice_weight: {e}") from e

    def loader(self, *, train: bool) -> LoaderConfig:
        return LoaderConfig(
            dataset=self.dataset,
            where=self.where if train else self.val_where,
            size=self.size,
            batch_size=self.batch_size,
            workers=self.workers,
            seed=self.seed,
            pos_rate=self.pos_rate if train else None,
            augment=train,
            in_channels=self.in_channels,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pos_rate"] = list(self.pos_rate) if self.pos_rate is not None else None
        return d


@dataclass(kw_only=True)
class _State:
    """What changes as training goes: the loop's position and its history."""

    step: int = 0
    best_dice: float = -1.0
    rows: list[dict[str, Any]]


@dataclass(kw_only=True)
class _Job:
    """What stays fixed during a run: config, process, model and its optimizer."""

    cfg: SegmentConfig
    env: DistEnv
    device: torch.device
    run: RunDir
    spe: int  # steps per epoch
    total: int
    meta: dict[str, Any]  # the checkpoint fields that do not change
    model: nn.Module  # the plain module: checkpoints, validation
    net: nn.Module  # what the training step calls: DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: FocalDiceLoss
    progress: Progress | None


def train_segment(cfg: SegmentConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train (or resume) a segmentation run; returns the final summary (see module doc).

    Under torchrun every rank calls this; ``progress`` is called on rank 0 only, with
    ``{"step", "total", "epoch", "loss", "images_per_s"}``.

    Raises:
        ConfigError: empty selection, a RUN that already holds a run (without ``resume``),
            or a resume against other data or another model.
        CheckpointError: ``resume`` without a checkpoint to resume from.
    """
    env = DistEnv.from_env()
    device = setup_device(env)
    try:
        job = _setup(cfg, env, device, progress)
        state = _start(job)
        job.run.write_json(CONFIG_FILE, {**job.meta["config"], **_plan(job)})
        log.info(
            "training %d steps (%d x %d) from step %d", job.total, cfg.epochs, job.spe, state.step
        )
        for epoch in range(state.step // job.spe, cfg.epochs):
            stats = _train_epoch(job, state, epoch)
            _end_epoch(job, state, epoch, stats)
        post, post_dice = _choose_postprocess(job)
        job.run.write_json(POSTPROCESS_FILE, {**post.to_dict(), "val_dice": post_dice})
        last = state.rows[-1] if state.rows else {}
        return {
            "run": job.run.url,
            "step": state.step,
            "total_steps": job.total,
            "best_val_dice": state.best_dice,
            "val_dice": last.get("val_dice"),
            "val_dice_pos": last.get("val_dice_pos"),
            "postprocess": post.to_dict(),
            "postprocess_val_dice": post_dice,
        }
    finally:
        teardown(env)


def _setup(cfg: SegmentConfig, env: DistEnv, device: torch.device, progress: Progress | None):
    """Select the data, size the run, build model, optimizer and schedule."""
    train_rows = select(cfg.dataset, cfg.where)
    if train_rows.num_rows == 0:
        raise ConfigError(f"--where {cfg.where!r} selects no rows in {cfg.dataset}")
    spe = cfg.steps_per_epoch or train_rows.num_rows // (cfg.batch_size * env.world_size)
    if spe < 1:
        raise ConfigError(
            f"{train_rows.num_rows} training rows give no full batch of {cfg.batch_size} on "
            f"{env.world_size} rank(s): lower --batch-size or pass --steps-per-epoch"
        )
    if select(cfg.dataset, cfg.val_where).num_rows == 0:
        raise ConfigError(f"--val-where {cfg.val_where!r} selects no rows in {cfg.dataset}")
    total = cfg.epochs * spe
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    model = build_unet(cfg.in_channels, cfg.encoder)
    if cfg.encoder_init and not cfg.resume:
        load_encoder_weights(model, cfg.encoder_init)
    if device.type == "cuda":
        model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=cfg.warmup_steps, total=total)
    )
    meta = {
        "task": "segment",
        "model_args": ckpts.model_args(cfg.encoder, cfg.in_channels),
        "steps_per_epoch": spe,
        "total_steps": total,
        "config": cfg.to_dict(),
        "manifest_fingerprint": manifest.fingerprint(train_rows),
        "train_rows": train_rows.num_rows,
        "world_size": env.world_size,
    }
    net = model
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    return _Job(
        cfg=cfg,
        env=env,
        device=device,
        run=RunDir(cfg.out, writer=env.is_main),
        spe=spe,
        total=total,
        meta=meta,
        model=model,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=FocalDiceLoss(focal_weight=cfg.focal_weight, dice_weight=cfg.dice_weight),
        progress=progress,
    )


def lr_factor(step: int, *, warmup: int, total: int, floor: float = 0.1) -> float:
    """Multiplier of the peak lr: linear warm-up, then cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


def _start(job: _Job) -> _State:
    """A fresh run (RUN must not hold one), or the state of ``last.pt`` with ``resume``."""
    cfg, run = job.cfg, job.run
    if not cfg.resume:
        if run.exists(ckpts.LAST):
            raise ConfigError(
                f"{run.url} already holds a run: pass --resume to continue it, "
                "or choose another --out"
            )
        return _State(rows=[])
    ckpt = ckpts.load_checkpoint(cfg.out, "last")
    _check_resumable(job, ckpt)
    job.model.load_state_dict(ckpt["model"])
    job.optimizer.load_state_dict(ckpt["optimizer"])
    job.scheduler.load_state_dict(ckpt["scheduler"])
    ckpts.set_rng_state(ckpt["rng"])
    step = int(ckpt["step"])
    # Epochs after the checkpoint's are redone: drop their lines, keep the earlier ones.
    rows = [r for r in run.metrics() if r["epoch"] < step // job.spe]
    log.info("resuming %s at step %d (epoch %d)", run.url, step, step // job.spe)
    return _State(step=step, best_dice=float(ckpt["best_score"]), rows=rows)


def _plan(job: _Job) -> dict[str, Any]:
    keys = ("steps_per_epoch", "total_steps", "manifest_fingerprint", "train_rows", "world_size")
    return {k: job.meta[k] for k in keys}


def _check_resumable(job: _Job, ckpt: dict[str, Any]) -> None:
    """Resuming only makes sense on the same rows, the same model and the same epochs."""
    problems = []
    for key in ("manifest_fingerprint", "model_args", "steps_per_epoch"):
        if ckpt.get(key) != job.meta[key]:
            problems.append(f"{key}: checkpoint {ckpt.get(key)!r}, now {job.meta[key]!r}")
    if problems:
        raise ConfigError(
            f"cannot resume {job.run.url}: "
            + "; ".join(problems)
            + " (same --where, dataset, model, --batch-size and world size needed)"
        )


def _train_epoch(job: _Job, state: _State, epoch: int) -> dict[str, Any]:
    """The rest of ``epoch``: exactly the same number of steps on every rank."""
    cfg, env = job.cfg, job.env
    job.model.train()
    started, first = time.perf_counter(), state.step
    loss_sum = torch.zeros((), device=job.device)
    batches = train_batches(
        cfg.loader(train=True),
        rank=env.rank,
        world_size=env.world_size,
        epoch=epoch,
        steps_per_epoch=job.spe,
        total_steps=job.total,
        start_step=state.step - epoch * job.spe,
    )
    for batch in islice(batches, (epoch + 1) * job.spe - state.step):
        loss_sum += _train_step(job, batch)
        state.step += 1
        end_of_epoch = state.step == (epoch + 1) * job.spe
        if env.is_main and state.step % cfg.checkpoint_every == 0 and not end_of_epoch:
            job.run.put(ckpts.LAST, _checkpoint(job, state, {}))
        if job.progress and env.is_main:
            done, seconds = state.step - first, time.perf_counter() - started
            job.progress(
                {
                    "step": state.step,
                    "total": job.total,
                    "epoch": epoch,
                    "loss": float(loss_sum) / done,
                    "images_per_s": done * cfg.batch_size * env.world_size / seconds,
                }
            )
    if state.step != (epoch + 1) * job.spe:  # fail now: a short rank would hang the others
        raise TrainingError(
            f"rank {env.rank} got {state.step - first} batches in epoch {epoch}, expected "
            f"{(epoch + 1) * job.spe - first}: the training stream ran short"
        )
    seconds = time.perf_counter() - started
    return {"batches": state.step - first, "seconds": seconds, "loss_sum": loss_sum}


def _train_step(job: _Job, batch: dict[str, Any]) -> torch.Tensor:
    images = images_to(job.device, batch["image"])
    masks = batch["mask"].to(job.device, non_blocking=True)
    with autocast(job.device, job.cfg.amp):
        logits = job.net(images)
    loss = job.loss_fn(logits, masks)
    job.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    job.optimizer.step()
    job.scheduler.step()
    return loss.detach()


def _end_epoch(job: _Job, state: _State, epoch: int, stats: dict[str, Any]) -> None:
    """Validate, log a metrics line, redraw the curves, write last.pt and maybe best.pt."""
    env, cfg = job.env, job.cfg
    sums = torch.stack([stats["loss_sum"], torch.tensor(float(stats["batches"])).to(job.device)])
    if env.distributed:
        dist.all_reduce(sums)
    broadcast_state(env, job.model)  # evaluate exactly the weights the checkpoint holds
    val = _validate(job, _val_batches(job, env.rank, env.world_size))
    images = stats["batches"] * cfg.batch_size * env.world_size
    row = {
        "epoch": epoch,
        "step": state.step,
        "lr": job.scheduler.get_last_lr()[0],
        "train_loss": float(sums[0] / sums[1]) if sums[1] else float("nan"),
        "images_per_s": images / max(stats["seconds"], 1e-9),
        "batches_per_rank": gather(env, stats["batches"]),
        "time_s": stats["seconds"],
        **{f"val_{k}": v for k, v in _summarise(gather(env, val)).items()},
    }
    state.rows.append(row)
    job.run.write_metrics(state.rows)
    improved = row["val_dice"] > state.best_dice
    state.best_dice = max(state.best_dice, row["val_dice"])
    if env.is_main:
        job.run.put(ckpts.LAST, _checkpoint(job, state, row))
        if improved:  # for inference only: no optimizer state, a third of the size
            job.run.put(ckpts.BEST, _checkpoint(job, state, row, resumable=False))
    log.info(
        "epoch %d: train loss %.4f, val loss %.4f, val dice %.4f (positives %.4f)",
        epoch,
        row["train_loss"],
        row["val_loss"],
        row["val_dice"],
        row["val_dice_pos"],
    )


def _checkpoint(job: _Job, state: _State, val: dict[str, Any], *, resumable=True) -> bytes:
    ckpt = {
        "format": ckpts.FORMAT,
        **job.meta,
        "model": job.model.state_dict(),
        "step": state.step,
        "epoch": state.step // job.spe,
        "best_score": state.best_dice,
        "val": val,
        "versions": ckpts.versions(),
    }
    if resumable:
        ckpt["optimizer"] = job.optimizer.state_dict()
        ckpt["scheduler"] = job.scheduler.state_dict()
        ckpt["rng"] = ckpts.rng_state()
    return ckpts.to_bytes(ckpt)


def _val_batches(job: _Job, rank: int, world_size: int) -> Iterable[dict[str, Any]]:
    return eval_batches(job.cfg.loader(train=False), rank=rank, world_size=world_size)


def _validate(job: _Job, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Loss and per-image pixel counts at probability 0.5 over this rank's share of val.

    The plain module is used, never DDP: ranks may hold different numbers of val batches,
    and DDP's forward would wait for the others.
    """
    model = job.model
    model.eval()
    inter, pred_area, true_area, loss_sum, n = [], [], [], 0.0, 0
    with torch.no_grad():
        for batch in batches:
            images = images_to(job.device, batch["image"])
            masks = batch["mask"].to(job.device, non_blocking=True)
            with autocast(job.device, job.cfg.amp):
                logits = model(images)
            loss_sum += float(job.loss_fn(logits, masks)) * len(images)
            n += len(images)
            counts = overlap_counts(logits.float() > 0, masks > 0.5)  # logit 0 = prob 0.5
            for acc, c in zip((inter, pred_area, true_area), counts, strict=True):
                acc.append(c)
    model.train()
    return {
        "inter": inter,
        "pred_area": pred_area,
        "true_area": true_area,
        "loss_sum": loss_sum,
        "n": n,
    }


def _summarise(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """SIIM Dice and friends from every rank's validation counts."""
    cat = {
        k: np.concatenate([a for p in parts for a in p[k]] or [np.zeros(0, np.int64)])
        for k in ("inter", "pred_area", "true_area")
    }
    dice = dice_from_counts(cat["inter"], cat["pred_area"], cat["true_area"])
    out = siim_summary(dice, cat["true_area"])
    n = sum(p["n"] for p in parts)
    out["loss"] = sum(p["loss_sum"] for p in parts) / n if n else float("nan")
    return out


def _choose_postprocess(job: _Job) -> tuple[PostProcess, float]:
    """The post-processing triplet maximising val SIIM Dice with the best weights.

    Scored at each image's full resolution, as ``pneumo evaluate`` reports it, and searched
    with and without flip TTA: the better is returned (it carries its TTA setting), both are
    recorded in ``postprocess_search.json``. Rank 0 loads ``best.pt`` and broadcasts the
    weights; every rank counts its share of the val split; the counts are gathered.
    """
    env, model = job.env, job.model
    if env.is_main:
        model.load_state_dict(ckpts.load_checkpoint(job.cfg.out, "best")["model"])
    broadcast_state(env, model)
    masks = fullres.FullResMasks(job.cfg.dataset, select(job.cfg.dataset, job.cfg.val_where))
    batches = _val_batches(job, env.rank, env.world_size)
    results = fullres.choose_postprocess(
        model, batches, masks, device=job.device, amp=job.cfg.amp, env=env
    )
    job.run.write_json(fullres.SEARCH_FILE, fullres.search_record(results))
    return fullres.better(results)
