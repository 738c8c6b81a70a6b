"""The segmentation loss against the textbook definitions, written out here with torch
primitives (not through segmentation-models-pytorch, which the loss uses)."""

from __future__ import annotations

import pytest
import torch

from pneumo.training.losses import FocalDiceLoss


def focal(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017, no alpha), the mean over every pixel."""
    p = torch.sigmoid(logits.double())
    y = target.double()
    pt = torch.where(y > 0, p, 1 - p)
    return (-((1 - pt) ** gamma) * torch.log(pt)).mean()


def dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the whole batch; 0 when the batch has no foreground."""
    p = torch.sigmoid(logits.double())
    y = target.double()
    if y.sum() == 0:
        return torch.zeros((), dtype=torch.float64)
    return 1 - 2 * (p * y).sum() / (p.sum() + y.sum())


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 1, 16, 16, generator=g) * 3
    target = (torch.rand(3, 1, 16, 16, generator=g) < 0.2).float()
    return logits, target


def test_the_default_is_ten_focal_gamma_two_plus_one_dice(batch):
    logits, target = batch
    want = 10 * focal(logits, target, 2.0) + dice(logits, target)
    assert float(FocalDiceLoss()(logits, target)) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize(
    "fw, dw, gamma", [(3.0, 0.5, 1.5), (0.0, 2.0, 2.0), (1.0, 0.0, 0.0), (2.0, 2.0, 2.0)]
)
def test_each_weight_and_gamma_is_used(batch, fw, dw, gamma):
    logits, target = batch
    want = fw * focal(logits, target, gamma) + dw * dice(logits, target)
    got = FocalDiceLoss(focal_weight=fw, dice_weight=dw, gamma=gamma)(logits, target)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_a_batch_without_foreground_has_no_dice_term(batch):
    logits, _ = batch
    empty = torch.zeros_like(logits)
    got = FocalDiceLoss(focal_weight=2.0, dice_weight=5.0)(logits, empty)
    assert float(got) == pytest.approx(float(2 * focal(logits, empty, 2.0)), rel=1e-5)


def test_bf16_logits_are_scored_in_float32(batch):
    logits, target = batch
    low = logits.to(torch.bfloat16)
    got = FocalDiceLoss()(low, target.to(torch.bfloat16))
    assert got.dtype == torch.float32
    want = 10 * focal(low.float(), target, 2.0) + dice(low.float(), target)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("fw, dw", [(-1.0, 1.0), (1.0, -0.5), (0.0, 0.0)])
def test_negative_or_all_zero_weights_are_refused(fw, dw):
    with pytest.raises(ValueError, match=r"^loss weights must be >= 0 and not both 0$"):
        FocalDiceLoss(focal_weight=fw, dice_weight=dw)
