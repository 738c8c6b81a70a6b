"""``pneumo train segment``: a U-Net/ResNet-34 on streamed SIIM shards, a task of the shared loop.

This file owns what is particular to segmentation; :mod:`pneumo.training.loop` owns the rest
(processes, pinned rows, resume, checkpoints, ``metrics.jsonl``, curves, GPU settings).
Read top to bottom:

1. the config: labelled SIIM train rows, validated on the labelled val rows, 512 px,
   batch 8, Adam at 1e-4, the positive share of a batch sliding 0.8 -> 0.4 (SIIM 1st place);
2. the model: a U-Net on a ResNet-34 encoder, random, or with the encoder taken from a
   ``train classify`` RUN, a checkpoint or a torchvision/timm state dict
   (``encoder_init``; its init chain goes into every checkpoint);
3. the optimizer: Adam, a linear warm-up over ``warmup_steps`` then cosine decay to 10% of
   ``lr`` at the last step (nanoGPT's schedule), stepped every step;
4. the step: 10 x focal + 1 x Dice loss on the logits (:mod:`pneumo.training.losses`);
5. validation: the SIIM Dice at probability 0.5, scored at the training resolution
   (``val_dice``, ``val_dice_pos`` on positives, ``val_empty_dice`` the all-empty
   baseline), and the loss; ``best.pt`` is the best ``val_dice``;
6. the end: the SIIM 1st-place post-processing triplet chosen on the val rows with the best
   weights, stored as ``postprocess.json`` for ``pneumo evaluate``/``predict``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pneumo.metrics.siim import PostProcess, dice_from_counts, overlap_counts, siim_summary
from pneumo.shards import selections, stream
from pneumo.shards.errors import ConfigError
from pneumo.training import checkpoint as ckpts
from pneumo.training import fullres, loop
from pneumo.training.data import LoaderConfig
from pneumo.training.job import Job, Progress
from pneumo.training.losses import DICE_WEIGHT, FOCAL_WEIGHT, FocalDiceLoss
from pneumo.training.model import build_unet, unet_args
from pneumo.training.runs import (
    LR_PANEL,
    POSTPROCESS_FILE,
    Panel,
    broadcast_state,
    images_to,
    masks_to,
)
from pneumo.training.task import RunConfig, Task, absolute
from pneumo.training.transfer import load_encoder_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SegmentConfig(RunConfig):
    """Everything a segmentation run depends on; stored whole in config.json and checkpoints.

    The shared settings (dataset, out, size, batch_size, epochs, workers, seed, resume...)
    are :class:`pneumo.training.task.RunConfig`'s. Segmentation adds:

    Attributes:
        lr: Adam's peak learning rate (the report: 1e-4).
        warmup_steps: linear warm-up steps before the cosine decay.
        encoder: smp encoder name.
        encoder_init: a classify RUN, a checkpoint, or a torchvision/timm ResNet state dict
            (file or s3://) for the encoder on a fresh start (None: random).
        pos_rate: positive share of training batches, sliding linearly from the first value
            to the second over the run (SIIM 1st place: 0.8 -> 0.4); None: the natural rate.
        focal_weight, dice_weight: loss weights (see pneumo.training.losses).
    """

    where: str = selections.SIIM_TRAIN
    val_where: str = selections.SIIM_VAL
    size: int = 512
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 100
    encoder: str = "resnet34"
    encoder_init: str | None = None
    pos_rate: tuple[float, float] | None = (0.8, 0.4)
    focal_weight: float = FOCAL_WEIGHT
    dice_weight: float = DICE_WEIGHT

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_init is not None:
            object.__setattr__(self, "encoder_init", absolute(self.encoder_init))
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
            workers=self.loader_workers,
            seed=self.seed,
            pos_rate=self.pos_rate if train else None,
            augment=train,
            in_channels=self.in_channels,
        )


def train_segment(cfg: SegmentConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train (or resume) a segmentation run; under torchrun every rank calls this.

    Returns the loop's summary (see :func:`pneumo.training.loop.run`) with ``val_dice``,
    ``val_dice_pos``, ``best_val_dice``, ``postprocess`` and ``postprocess_val_dice``.
    """
    return loop.run(SegmentTask(cfg), progress)


class SegmentTask(Task):
    """The U-Net on SIIM masks: model, step, validation, optimizer, post-processing."""

    name = "segment"
    best = ("val_dice", "max")
    headline = ("train_loss", "val_loss", "val_dice", "val_dice_pos", "val_empty_dice")
    panels = (
        Panel(
            "loss (10 x focal + Dice)",
            (("train_loss", "training loss"), ("val_loss", "validation loss")),
        ),
        Panel(
            "validation SIIM Dice (p > 0.5, training size)",
            (
                ("val_dice", "model, all images"),
                ("val_dice_pos", "model, images with pneumothorax"),
                ("val_empty_dice", "baseline: predict nothing"),
            ),
        ),
        LR_PANEL,
    )
    schedule_on = "step"
    cfg: SegmentConfig

    def __init__(self, cfg: SegmentConfig) -> None:
        super().__init__(cfg)
        self.loss_fn = FocalDiceLoss(focal_weight=cfg.focal_weight, dice_weight=cfg.dice_weight)

    # --- the data: labelled rows, positives drawn at the configured rate

    def loader(self, *, train: bool) -> LoaderConfig:
        return self.cfg.loader(train=train)

    def prepare_rows(self, rows: pa.Table, *, train: bool) -> pa.Table:
        labelled = rows.filter(pc.is_valid(rows["has_ptx"]))
        if labelled.num_rows < rows.num_rows:
            log.warning(
                "%d unlabelled rows left out of %s",
                rows.num_rows - labelled.num_rows,
                "training" if train else "validation",
            )
        return labelled

    def pools(self, rows: pa.Table) -> dict[str, list[stream.Entry]]:
        return stream.class_pools(stream.entries_from_table(rows), self.cfg.pos_rate)

    # --- the model and its optimizer

    def model_args(self) -> dict[str, Any]:
        return unet_args(self.cfg.encoder, self.cfg.in_channels)

    def build_model(self) -> torch.nn.Module:
        return build_unet(self.cfg.in_channels, self.cfg.encoder)

    def init_weights(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        if self.cfg.encoder_init is None:
            return []
        return load_encoder_weights(model, self.cfg.encoder_init).chain

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.cfg.lr)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        warmup = self.cfg.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, warmup=warmup, total=total_steps)
        )

    # --- the step and the validation

    def loss(self, job: Job, batch: dict[str, Any]) -> torch.Tensor:
        images = images_to(job.device, batch["image"])
        masks = masks_to(job.device, batch["mask"])
        return self.loss_fn(job.net(images), masks)

    def validate(self, job: Job, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Loss and per-image pixel counts at probability 0.5 over this rank's val share."""
        inter, pred_area, true_area, loss_sum, n = [], [], [], 0.0, 0
        for batch in batches:
            images = images_to(job.device, batch["image"])
            masks = masks_to(job.device, batch["mask"])
            logits = job.model(images)
            loss_sum += float(self.loss_fn(logits, masks)) * len(images)
            n += len(images)
            counts = overlap_counts(logits.float() > 0, masks > 0.5)  # logit 0 = prob 0.5
            for acc, c in zip((inter, pred_area, true_area), counts, strict=True):
                acc.append(c)
        return {
            "inter": inter,
            "pred_area": pred_area,
            "true_area": true_area,
            "loss_sum": loss_sum,
            "n": n,
        }

    def summarise(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
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

    # --- the end: the post-processing triplet

    def finish(self, job: Job) -> dict[str, Any]:
        post, post_dice = _choose_postprocess(job)
        job.run.write_json(POSTPROCESS_FILE, {**post.to_dict(), "val_dice": post_dice})
        return {"postprocess": post.to_dict(), "postprocess_val_dice": post_dice}


def lr_factor(step: int, *, warmup: int, total: int, floor: float = 0.1) -> float:
    """Multiplier of the peak lr: linear warm-up, then cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


def _choose_postprocess(job: Job) -> tuple[PostProcess, float]:
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
    masks = fullres.FullResMasks(job.cfg.dataset, job.val_rows)  # the run's pinned val rows
    batches = loop.val_batches(job)  # the run's loader workers, still up
    results = fullres.choose_postprocess(
        model, batches, masks, device=job.device, amp=job.cfg.amp, env=env
    )
    job.run.write_json(fullres.SEARCH_FILE, fullres.search_record(results))
    return fullres.better(results)
