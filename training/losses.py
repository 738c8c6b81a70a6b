"""The segmentation loss: a weighted sum of focal loss and Dice loss, from logits.

Focal loss (Lin et al. 2017) down-weights the many easy background pixels, so the small
pneumothorax regions still drive the gradient; Dice loss optimises overlap directly, close
to what the SIIM score rewards.

Defaults ``focal_weight=10``, ``dice_weight=1`` (focal ``gamma=2``) follow the Kaggle kernel
the project report cites (Rishabh Agrahari, "UNet with ResNet34 encoder (Pytorch)",
``MixedLoss(alpha=10, gamma=2)``). That kernel adds ``-log(dice)``; we use smp's
``DiceLoss`` (``1 - soft Dice`` over the batch, zero for a batch with no foreground),
which is bounded and does not blow up on batches of healthy images.
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn

FOCAL_WEIGHT = 10.0
DICE_WEIGHT = 1.0
FOCAL_GAMMA = 2.0


class FocalDiceLoss(nn.Module):
    """``focal_weight * focal + dice_weight * dice`` for binary masks, from logits.

    Args:
        focal_weight: weight of the focal term (default 10, after the cited kernel).
        dice_weight: weight of the Dice term (default 1).
        gamma: focal loss focusing parameter (default 2).
    """

    def __init__(
        self,
        focal_weight: float = FOCAL_WEIGHT,
        dice_weight: float = DICE_WEIGHT,
        gamma: float = FOCAL_GAMMA,
    ) -> None:
        super().__init__()
        if focal_weight < 0 or dice_weight < 0 or focal_weight + dice_weight == 0:
            raise ValueError("loss weights must be >= 0 and not both 0")
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.focal = FocalLoss(mode="binary", gamma=gamma)
        self.dice = DiceLoss(mode="binary", from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss for logits and 0/1 targets, both ``[B, 1, H, W]``."""
        # Losses in float32 even under bf16 autocast: sums over 512^2 pixels lose too much.
        logits, target = logits.float(), target.float()
        loss = logits.new_zeros(())
        if self.focal_weight:
            loss = loss + self.focal_weight * self.focal(logits, target)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss
