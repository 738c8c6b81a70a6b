"""Convolutional autoencoder and β-VAE for grey chest X-rays, and their losses.

The encoder halves the image five times (stride-2 convolutions, so ``size`` is a multiple of
32) and maps the last feature map to a ``latent_dim`` vector: the code of the plain
autoencoder, ``mu`` and ``logvar`` heads for the VAE. The decoder mirrors it and returns
*logits*: the losses apply the sigmoid themselves (``binary_cross_entropy_with_logits``,
safe under bf16 autocast; ``BCELoss`` raises under autocast).

Losses, per image (summed over pixels or latent dimensions) and averaged over the batch::

    ae   loss = BCE(x, x̂)                                   (targets in [0, 1])
    vae  loss = BCE(x, x̂) + β · w(step) · KL(q(z|x) || N(0, I))

The β-VAE needs both terms on the same footing: a reconstruction averaged over pixels
against a KL summed over dimensions weights the KL ``pixels`` times too much, and the
posterior collapses. ``w(step)`` anneals the KL in linearly over ``kl_anneal_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from pneumo.shards.errors import ConfigError

KINDS = ("ae", "vae")
CHANNELS = (32, 64, 128, 256, 256)  # feature maps after each halving
STRIDE = 2 ** len(CHANNELS)  # the image side must be a multiple of this


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.GroupNorm(8, c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.GroupNorm(8, c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


class Autoencoder(nn.Module):
    """``kind="ae"``: image -> code -> image logits; ``kind="vae"``: the same through
    ``mu``/``logvar`` and a reparameterised sample (training) or ``mu`` (eval)."""

    def __init__(self, *, kind: str, size: int, latent_dim: int, in_channels: int = 1) -> None:
        super().__init__()
        check_model_args(kind=kind, size=size, latent_dim=latent_dim, in_channels=in_channels)
        self.kind, self.size, self.latent_dim = kind, size, latent_dim
        self.side = size // STRIDE
        widths = (in_channels, *CHANNELS)
        self.features = nn.Sequential(*[_down(a, b) for a, b in pairwise(widths)])
        flat = CHANNELS[-1] * self.side * self.side
        self.to_code = nn.Linear(flat, latent_dim * (2 if kind == "vae" else 1))
        self.from_code = nn.Linear(latent_dim, flat)
        back = tuple(reversed(CHANNELS))
        self.expand = nn.Sequential(*[_up(a, b) for a, b in pairwise(back)])
        self.to_image = nn.ConvTranspose2d(CHANNELS[0], in_channels, 4, stride=2, padding=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(mu, logvar)`` for the VAE, ``(code, None)`` for the autoencoder."""
        h = self.to_code(self.features(x).flatten(1))
        if self.kind == "vae":
            mu, logvar = h.chunk(2, dim=1)
            return mu, logvar
        return h, None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding of a batch: the code, or the VAE's ``mu`` (never a sample)."""
        return self.encode(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image logits ``[B, C, size, size]`` for codes ``[B, latent_dim]``."""
        h = self.from_code(z).view(len(z), CHANNELS[-1], self.side, self.side)
        return self.to_image(self.expand(F.leaky_relu(h, 0.2)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logits, mu, logvar)``; a VAE in training mode decodes a sample of q(z|x)."""
        mu, logvar = self.encode(x)
        z = mu
        if logvar is not None and self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def check_model_args(*, kind: str, size: int, latent_dim: int, in_channels: int) -> None:
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: expected ae or vae")
    if size < STRIDE or size % STRIDE:
        raise ConfigError(f"--size must be a multiple of {STRIDE}, got {size}")
    if latent_dim < 1 or in_channels < 1:
        raise ConfigError("--latent-dim and in_channels must be at least 1")


def build_autoencoder(args: dict) -> Autoencoder:
    """The network a checkpoint's ``model_args`` describe (``arch`` "autoencoder")."""
    return Autoencoder(
        kind=args["kind"],
        size=args["size"],
        latent_dim=args["latent_dim"],
        in_channels=args.get("in_channels", 1),
    )


def model_args(kind: str, size: int, latent_dim: int, in_channels: int = 1) -> dict:
    return {
        "arch": "autoencoder",
        "kind": kind,
        "size": size,
        "latent_dim": latent_dim,
        "in_channels": in_channels,
    }


# ---------------------------------------------------------------- losses


def reconstruction_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over each image's pixels, averaged over the batch."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return per_pixel.flatten(1).sum(1).mean()


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent dimension, averaged over the batch."""
    mu, logvar = mu.float(), logvar.float()
    return (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).mean(0)


def kl_weight(step: int, anneal_steps: int) -> float:
    """The KL's share of β at ``step``: 0 -> 1 linearly over ``anneal_steps`` (1 without)."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


@dataclass(frozen=True)
class Losses:
    """One batch's loss (what is minimised) and its parts, per image."""

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor  # 0 for the plain autoencoder
    kl_per_dim: torch.Tensor | None


def autoencoder_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor | None,
    *,
    beta: float = 1.0,
    weight: float = 1.0,
) -> Losses:
    """BCE reconstruction (+ ``beta * weight`` x KL for a VAE), each summed per image and
    averaged over the batch (see the module doc)."""
    reconstruction = reconstruction_bce(logits, target)
    if logvar is None:
        return Losses(reconstruction, reconstruction, torch.zeros_like(reconstruction), None)
    per_dim = kl_per_dim(mu, logvar)
    kl = per_dim.sum()
    return Losses(reconstruction + beta * weight * kl, reconstruction, kl, per_dim)


def mse_psnr(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean squared error of the reconstruction (sigmoid of the logits) and its PSNR (peak 1)."""
    mse = float(F.mse_loss(torch.sigmoid(logits.float()), target.float()))
    return mse, 10.0 * math.log10(1.0 / max(mse, 1e-12))
