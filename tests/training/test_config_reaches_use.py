"""Every training setting reaches the object that uses it.

Each test sets an option to a value no default has and reads it back from its consumer:
the optimizer's param groups, the loss module (and the loss it computes), the schedulers
(their attributes and what they do with a falling and a flat validation loss), the KL
weight at given steps, the sampler's positives per batch, and the batches PreciseBN
forwards. The first tests start at the command line, so an option dropped on its way to
the config fails too. Nothing trains: objects are built, at most a few forwards on tiny
tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.shards import stream
from pneumo.training import autoencode, classify, data, loop, segment
from pneumo.training.autoencode import AutoencodeConfig, AutoencodeTask
from pneumo.training.autoencoders import Autoencoder
from pneumo.training.classify import ClassifyConfig, ClassifyTask
from pneumo.training.job import Job
from pneumo.training.segment import SegmentConfig, SegmentTask

CPU = torch.device("cpu")


def _tiny_model() -> nn.Module:
    """Something with parameters and a BatchNorm, for optimizers and PreciseBN."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    )


def _lr(optimizer: torch.optim.Optimizer) -> float:
    (lr,) = {g["lr"] for g in optimizer.param_groups}
    return lr


# ---------------------------------------------------------------- the command line


def _captured(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, args: list[str]) -> Any:
    """The config ``pneumo train ...`` hands to ``module.name``, which does not train."""
    seen: list[Any] = []

    def fake(cfg: Any, progress: Any = None) -> dict[str, Any]:
        seen.append(cfg)
        return {"task": "x", "step": 0, "total_steps": 0, "run": cfg.out}

    monkeypatch.setattr(module, name, fake)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    return cfg


def test_segment_options_reach_the_optimizer_loss_schedule_and_sampler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    args = ["train", "segment", str(tmp_path), "--out", str(tmp_path / "run")]
    args += ["--lr", "0.0037", "--focal-weight", "3", "--dice-weight", "0.25"]
    args += ["--pos-rate", "0.7:0.3", "--warmup-steps", "7", "--precise-bn", "5"]
    cfg = _captured(monkeypatch, segment, "train_segment", args)
    assert (cfg.lr, cfg.focal_weight, cfg.dice_weight) == (0.0037, 3.0, 0.25)
    assert (cfg.pos_rate, cfg.warmup_steps, cfg.precise_bn) == ((0.7, 0.3), 7, 5)
    task = SegmentTask(cfg)
    assert _lr(task.optimizer(_tiny_model())) == 0.0037
    assert (task.loss_fn.focal_weight, task.loss_fn.dice_weight) == (3.0, 0.25)
    assert task.loader(train=True).pos_rate == (0.7, 0.3)


def test_classify_options_reach_the_optimizer_scheduler_and_sampler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    args = ["train", "classify", str(tmp_path), "--out", str(tmp_path / "run")]
    args += ["--lr", "0.023", "--momentum", "0.55", "--plateau-patience", "2"]
    args += ["--plateau-factor", "0.3", "--balance", "pos-rate:0.7:0.3", "--precise-bn", "3"]
    cfg = _captured(monkeypatch, classify, "train_classify", args)
    task = ClassifyTask(cfg)
    optimizer = task.optimizer(_tiny_model())
    assert isinstance(optimizer, torch.optim.SGD)
    assert _lr(optimizer) == 0.023
    assert {g["momentum"] for g in optimizer.param_groups} == {0.55}
    plateau = task.scheduler(optimizer, total_steps=100)
    assert (plateau.mode, plateau.factor, plateau.patience) == ("min", 0.3, 2)
    assert task.loader(train=True).pos_rate == (0.7, 0.3)
    assert cfg.precise_bn == 3


def test_autoencode_options_reach_the_optimizer_and_the_kl_weight(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    args = ["train", "autoencode", str(tmp_path), "--out", str(tmp_path / "run")]
    args += ["--kind", "vae", "--size", "64", "--latent-dim", "4", "--lr", "0.0031"]
    args += ["--beta", "2.5", "--kl-anneal-steps", "40", "--precise-bn", "2"]
    cfg = _captured(monkeypatch, autoencode, "train_autoencode", args)
    assert (cfg.beta, cfg.kl_anneal_steps, cfg.precise_bn) == (2.5, 40, 2)
    task = AutoencodeTask(cfg)
    assert _lr(task.optimizer(_tiny_model())) == 0.0031
    job = SimpleNamespace(step=10, total=1000)
    assert task.kl_weight(job) == pytest.approx(10 / 40)


def test_command_defaults_are_the_documented_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """README: PreciseBN 16 batches for classify, 0 for segment and autoencode; the KL
    annealed over a quarter of the run when no step count is given."""
    base = [str(tmp_path), "--out", str(tmp_path / "run")]
    seg = _captured(monkeypatch, segment, "train_segment", ["train", "segment", *base])
    cls = _captured(monkeypatch, classify, "train_classify", ["train", "classify", *base])
    ae_args = ["train", "autoencode", *base, "--kind", "vae"]
    ae = _captured(monkeypatch, autoencode, "train_autoencode", ae_args)
    assert (seg.precise_bn, cls.precise_bn, ae.precise_bn) == (0, 16, 0)
    assert (seg.focal_weight, seg.dice_weight, seg.pos_rate) == (10.0, 1.0, (0.8, 0.4))
    assert (cls.plateau_patience, cls.plateau_factor) == (5, 0.1)
    assert ae.kl_anneal_steps is None
    task = AutoencodeTask(ae)
    weights = [task.kl_weight(SimpleNamespace(step=s, total=200)) for s in (0, 10, 25, 50, 90)]
    assert weights == pytest.approx([0.0, 0.2, 0.5, 1.0, 1.0])  # over 200 / 4 = 50 steps


# ---------------------------------------------------------------- segmentation


def _segment(**changes: Any) -> SegmentConfig:
    base: dict[str, Any] = dict(dataset="/data", out="/run", size=64, batch_size=10, workers=0)
    return SegmentConfig(**{**base, **changes})


def test_segment_loss_is_the_configured_weighted_sum() -> None:
    """3 x focal + 0.25 x Dice, computed from the terms on their own, through the task's
    training step; swapped weights would give 0.25 x focal + 3 x Dice."""
    task = SegmentTask(_segment(focal_weight=3.0, dice_weight=0.25))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=gen)
    masks = (torch.rand(2, 1, 8, 8, generator=gen) > 0.7).to(torch.uint8)
    focal = float(FocalLoss(mode="binary", gamma=2.0)(logits, masks.float()))
    dice = float(DiceLoss(mode="binary", from_logits=True)(logits, masks.float()))
    assert abs(focal - dice) > 0.05  # so a swap shows
    job = SimpleNamespace(device=CPU, net=lambda _images: logits)
    batch = {"image": torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "mask": masks}
    assert float(task.loss(job, batch)) == pytest.approx(3.0 * focal + 0.25 * dice, rel=1e-5)
    only_dice = SegmentTask(_segment(focal_weight=0.0, dice_weight=2.0))
    assert float(only_dice.loss(job, batch)) == pytest.approx(2.0 * dice, rel=1e-5)


def test_segment_lr_warms_up_over_the_configured_steps_then_decays() -> None:
    task = SegmentTask(_segment(lr=0.003, warmup_steps=4))
    optimizer = task.optimizer(_tiny_model())
    schedule = task.scheduler(optimizer, total_steps=20)
    lrs = [_lr(optimizer)]
    for _ in range(20):
        optimizer.step()
        schedule.step()
        lrs.append(_lr(optimizer))
    # warm-up (s + 1) / 4 of the peak, the peak at step 3, a cosine to a tenth at step 20
    assert lrs[:5] == pytest.approx([0.003 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0)])
    assert lrs[12] == pytest.approx(0.003 * (0.1 + 0.9 * 0.5))  # half way down
    assert lrs[20] == pytest.approx(0.0003)


# ---------------------------------------------------------------- the positive rate


def _rows(n_pos: int, n_neg: int) -> pa.Table:
    keys = [f"k{i:03d}" for i in range(n_pos + n_neg)]
    has_ptx = [True] * n_pos + [False] * n_neg
    return pa.table(
        {
            "key": keys,
            "shard": ["s-000000.tar"] * len(keys),
            "image_id": keys,
            "has_ptx": has_ptx,
            "label": [int(p) for p in has_ptx],
        }
    )


def _positives_per_batch(
    monkeypatch: pytest.MonkeyPatch, loader: data.LoaderConfig, pools: dict, steps: int
) -> list[int]:
    """The positives in each batch of an epoch, as the training stream draws them."""
    specs: list[stream.TrainSpec] = []

    class Capture:
        def __init__(self, cfg: Any, pools: dict, spec: stream.TrainSpec) -> None:
            specs.append(spec)

    monkeypatch.setattr(data, "TrainBatches", Capture)
    monkeypatch.setattr(data, "_batches", lambda dataset, cfg: iter(()))
    data.train_batches(
        loader, rank=0, world_size=1, epoch=0, steps_per_epoch=steps, total_steps=steps,
        pools=pools,
    )  # fmt: skip
    (spec,) = specs
    return [stream.batch_draws(spec, step, pools)[0].count(stream.POS) for step in range(steps)]


def _expected_positives(a: float, b: float, batch: int, steps: int) -> list[int]:
    """The rate slides linearly from a to b; the running sum of batch x rate, rounded."""
    cumulative = [0]
    total = 0.0
    for j in range(steps):
        total += batch * (a + (b - a) * j / steps)
        cumulative.append(math.floor(total + 0.5))
    return [hi - lo for lo, hi in zip(cumulative, cumulative[1:], strict=False)]


def test_segment_pos_rate_sets_the_positives_of_every_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = SegmentTask(_segment(pos_rate=(0.7, 0.3)))
    pools = task.pools(_rows(20, 20))
    assert set(pools) == {stream.POS, stream.NEG}
    got = _positives_per_batch(monkeypatch, task.loader(train=True), pools, steps=5)
    assert got == _expected_positives(0.7, 0.3, 10, 5) == [7, 6, 6, 4, 4]
    assert task.loader(train=False).pos_rate is None  # validation keeps the data's mix


def test_classify_balance_pos_rate_sets_the_positives_of_every_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = ClassifyConfig(
        dataset="/data", out="/run", size=64, batch_size=10, workers=0, balance="pos-rate:0.7:0.3"
    )
    task = ClassifyTask(cfg)
    rows = _rows(20, 20)
    task.use_rows(rows, rows)
    pools = task.pools(rows)
    assert set(pools) == {stream.POS, stream.NEG}
    assert {e.key for e in pools[stream.POS]} == {f"k{i:03d}" for i in range(20)}
    got = _positives_per_batch(monkeypatch, task.loader(train=True), pools, steps=5)
    assert got == _expected_positives(0.7, 0.3, 10, 5)


# ---------------------------------------------------------------- the plateau scheduler


def _plateau(patience: int = 2, factor: float = 0.3) -> tuple[Any, torch.optim.Optimizer]:
    cfg = ClassifyConfig(
        dataset="/data",
        out="/run",
        size=64,
        workers=0,
        lr=0.02,
        plateau_patience=patience,
        plateau_factor=factor,
    )
    task = ClassifyTask(cfg)
    assert task.schedule_on == "val_loss"  # the loop steps it with the validation loss
    optimizer = task.optimizer(_tiny_model())
    return task.scheduler(optimizer, total_steps=100), optimizer


def _lrs_after(losses: list[float], patience: int = 2, factor: float = 0.3) -> list[float]:
    """The learning rate after each epoch's ``scheduler.step(val_loss)``, as the loop does."""
    scheduler, optimizer = _plateau(patience, factor)
    out = []
    for loss in losses:
        scheduler.step(loss)
        out.append(_lr(optimizer))
    return out


def test_a_falling_validation_loss_never_lowers_the_lr() -> None:
    """mode="max" would read a falling loss as a stall and lower the rate at epoch 4."""
    assert _lrs_after([1.0 - 0.1 * i for i in range(9)]) == pytest.approx([0.02] * 9)


def test_a_flat_validation_loss_lowers_the_lr_after_patience_epochs() -> None:
    """Patience 2, factor 0.3: the first epoch sets the best, two more are tolerated, the
    third without a lower loss multiplies the rate by 0.3; then again three epochs later."""
    lrs = _lrs_after([1.0] * 7)
    assert lrs == pytest.approx([0.02, 0.02, 0.02, 0.006, 0.006, 0.006, 0.0018])
    # a rising loss is no better than a flat one
    assert _lrs_after([1.0, 1.1, 1.2, 1.3]) == pytest.approx([0.02, 0.02, 0.02, 0.006])
    # other patience and factor: the change comes when they say
    assert _lrs_after([1.0] * 3, patience=1, factor=0.5) == pytest.approx([0.02, 0.02, 0.01])


# ---------------------------------------------------------------- the β-VAE


def _vae(**changes: Any) -> AutoencodeTask:
    base: dict[str, Any] = dict(
        dataset="/data", out="/run", kind="vae", size=64, latent_dim=4, batch_size=2, workers=0
    )
    return AutoencodeTask(AutoencodeConfig(**{**base, **changes}))


def test_kl_anneal_steps_set_the_kl_weight_at_each_step() -> None:
    task = _vae(kl_anneal_steps=40)
    weights = [task.kl_weight(SimpleNamespace(step=s, total=1000)) for s in (0, 10, 30, 40, 99)]
    assert weights == pytest.approx([0.0, 0.25, 0.75, 1.0, 1.0])
    none = _vae(kl_anneal_steps=0)  # no annealing: the full β from the first step
    assert none.kl_weight(SimpleNamespace(step=0, total=1000)) == 1.0


def test_beta_and_the_annealed_weight_reach_the_training_loss() -> None:
    """The loss at step 10 of 40 annealing steps with β 2.5: BCE summed over pixels plus
    2.5 x 0.25 x KL summed over dimensions, both averaged over the batch."""
    task = _vae(beta=2.5, kl_anneal_steps=40)
    torch.manual_seed(0)
    model = Autoencoder(kind="vae", size=64, latent_dim=4)
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    job = SimpleNamespace(device=CPU, net=model, step=10, total=1000)
    with torch.no_grad():
        torch.manual_seed(1)
        loss = float(task.loss(job, {"image": images}))
        torch.manual_seed(1)  # the same reparameterisation noise
        logits, mu, logvar = model(images.float() / 255)
    x = images.float() / 255
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / 2
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum() / 2
    assert float(kl) > 1e-3  # so the KL term counts
    assert loss == pytest.approx(float(bce + 2.5 * 0.25 * kl), rel=1e-5)


# ---------------------------------------------------------------- PreciseBN


def test_precise_bn_forwards_the_configured_number_of_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """precise_bn=3 of 5 steps: exactly the epoch's first 3 batches are forwarded, and the
    BatchNorm statistics are their plain average (not 16, the default, nor all 5)."""
    cfg = ClassifyConfig(
        dataset="/data", out="/run", size=64, batch_size=4, workers=0, precise_bn=3, amp=False
    )
    task = ClassifyTask(cfg)
    task.label_of = {f"k{i}": i % 2 for i in range(4)}
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.randint(0, 256, (4, 1, 8, 8), generator=gen, dtype=torch.uint8)
            + 40 * i,  # distinct statistics per batch
            "key": [f"k{j}" for j in range(4)],
        }
        for i in range(5)
    ]
    given: list[int] = []

    def epoch_batches(job: Any, epoch: int, *, start_step: int) -> Iterator[dict[str, Any]]:
        assert (epoch, start_step) == (2, 0)
        for i, batch in enumerate(batches):
            given.append(i)
            yield batch

    monkeypatch.setattr(loop, "_epoch_batches", epoch_batches)
    torch.manual_seed(0)
    model = _tiny_model()
    job = Job(
        cfg=cfg, task=task, env=None, device=CPU, run=None, spe=5, total=50, meta={},
        train_rows=None, val_rows=None, val_entries=[], pools={}, model=model, net=model,
        optimizer=None, scheduler=None, progress=None, history=[],
    )  # fmt: skip
    loop.precise_bn(job, 2)
    assert given == [0, 1, 2]
    conv, norm = model[0], model[1]
    with torch.no_grad():
        outs = [conv(b["image"].float() / 255).double() for b in batches[:3]]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1) for o in outs]).mean(0)
    assert torch.allclose(norm.running_mean.double(), means, atol=1e-5)
    assert torch.allclose(norm.running_var.double(), variances, rtol=1e-4)
    assert norm.momentum == 0.1  # restored
    assert norm.num_batches_tracked == 3
    fewer = replace(cfg, precise_bn=0)
    before = norm.running_mean.clone()
    loop.precise_bn(replace(job, cfg=fewer), 2)
    assert torch.equal(norm.running_mean, before)  # 0: left as they were
