"""``Predictor``: flip TTA reaches the model and changes what it predicts."""

from __future__ import annotations

import math

import torch
from torch import nn

from pneumo.evaluation.inference import Predictor
from pneumo.metrics.siim import PostProcess


class ShiftLeft(nn.Module):
    """Logits = 20 * (the pixel to the right) - 10: a model that is not mirror-symmetric."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        right = torch.zeros_like(x)
        right[..., :-1] = x[..., 1:]
        return 20 * right - 10


def predictor(tta: bool) -> Predictor:
    return Predictor(
        model=ShiftLeft(),
        post=PostProcess(tta=tta),
        size=8,
        in_channels=1,
        device=torch.device("cpu"),
        tta=tta,
        amp=False,
        checkpoint={},
    )


def test_tta_averages_with_the_mirrored_prediction_flipped_back() -> None:
    image = torch.zeros(1, 1, 8, 8)
    image[..., 3] = 1.0  # one bright column: an asymmetric input
    low, high = 1 / (1 + math.exp(10)), 1 / (1 + math.exp(-10))  # sigmoid(-10), sigmoid(10)

    plain = predictor(tta=False).probabilities(image)[0]
    expected = torch.full((8, 8), low)
    expected[:, 2] = high  # the model moves the column one to the left
    torch.testing.assert_close(plain, expected)

    # The mirror moves it one to the right; the mean of the two, per pixel:
    tta = predictor(tta=True).probabilities(image)[0]
    expected = torch.full((8, 8), low)
    expected[:, 2] = expected[:, 4] = (high + low) / 2
    torch.testing.assert_close(tta, expected)
