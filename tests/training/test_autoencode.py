"""Autoencoder and β-VAE: shapes, the loss's scaling (by hand), KL per dimension, learning."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pneumo.shards.errors import ConfigError
from pneumo.training.autoencode import AutoencodeConfig, train_autoencode
from pneumo.training.autoencoders import (
    Autoencoder,
    autoencoder_loss,
    kl_per_dim,
    kl_weight,
    mse_psnr,
)


def bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_elbo_sums_over_pixels_and_dims_and_averages_over_the_batch() -> None:
    """Two 2x2 images, two latent dimensions, every term worked out by hand."""
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]], [[[1.0, -2.0], [0.5, 0.0]]]])
    target = torch.tensor([[[[0.5, 1.0], [0.0, 0.2]]], [[[1.0, 0.0], [0.3, 0.9]]]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])

    per_image = [
        sum(
            bce(l_, t_)
            for l_, t_ in zip(img.flatten().tolist(), tgt.flatten().tolist(), strict=True)
        )
        for img, tgt in zip(logits, target, strict=True)
    ]
    reconstruction = sum(per_image) / 2  # summed over the 4 pixels, averaged over 2 images
    # KL per element: 0.5 (mu² + σ² - 1 - log σ²)
    kl_elements = [[0.5, 0.5 * (2 - 1 - math.log(2.0))], [0.0, 0.5 * 4]]
    per_dim = [(kl_elements[0][d] + kl_elements[1][d]) / 2 for d in range(2)]
    kl = sum(per_dim)

    got = autoencoder_loss(logits, target, mu, logvar, beta=4.0, weight=0.5)
    assert float(got.reconstruction) == pytest.approx(reconstruction, rel=1e-6)
    assert got.kl_per_dim.tolist() == pytest.approx(per_dim, rel=1e-6)
    assert float(got.kl) == pytest.approx(kl, rel=1e-6)
    assert float(got.loss) == pytest.approx(reconstruction + 4.0 * 0.5 * kl, rel=1e-6)
    # The plain autoencoder: the same reconstruction, nothing else.
    plain = autoencoder_loss(logits, target, mu, None)
    assert float(plain.loss) == pytest.approx(reconstruction, rel=1e-6)
    assert float(plain.kl) == 0.0 and plain.kl_per_dim is None


def test_a_collapsed_dimension_has_zero_kl() -> None:
    mu = torch.stack([torch.zeros(64), torch.randn(64) * 3], dim=1)
    logvar = torch.stack([torch.zeros(64), torch.full((64,), -2.0)], dim=1)
    per_dim = kl_per_dim(mu, logvar)
    assert float(per_dim[0]) == 0.0  # the prior itself: an unused dimension
    assert float(per_dim[1]) > 1.0


def test_kl_is_annealed_in_linearly() -> None:
    assert [kl_weight(s, 10) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert kl_weight(0, 0) == 1.0


def test_psnr_of_a_known_error() -> None:
    target = torch.full((1, 1, 4, 4), 0.5)
    logits = torch.full((1, 1, 4, 4), math.log(0.6 / 0.4))  # sigmoid = 0.6: error 0.1
    mse, psnr = mse_psnr(logits, target)
    assert mse == pytest.approx(0.01, rel=1e-5)
    assert psnr == pytest.approx(20.0, rel=1e-5)


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_shapes_and_the_embedding_is_the_mean(kind: str) -> None:
    torch.manual_seed(0)
    model = Autoencoder(kind=kind, size=64, latent_dim=16)
    x = torch.rand(3, 1, 64, 64)
    logits, mu, logvar = model(x)
    assert logits.shape == x.shape and mu.shape == (3, 16)
    assert (logvar is None) == (kind == "ae")
    model.eval()
    with torch.no_grad():
        first, second = model.embed(x), model.embed(x)
        assert torch.equal(first, second)  # deterministic: mu, never a sample
        assert torch.equal(first, model(x)[1])
        if kind == "vae":  # in eval mode the decoder sees mu, so reconstructions repeat too
            assert torch.equal(model(x)[0], model(x)[0])


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_the_loss_falls_on_a_fixed_batch(kind: str) -> None:
    torch.manual_seed(0)
    model = Autoencoder(kind=kind, size=64, latent_dim=8)
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    images = torch.stack(
        [((x - c) ** 2 + (y - 0.5) ** 2 < 0.1).float() for c in (0.3, 0.5, 0.7, 0.4)]
    )
    images = images[:, None]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        logits, mu, logvar = model(images)
        out = autoencoder_loss(logits, images, mu, logvar, beta=1.0, weight=kl_weight(step, 10))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.reconstruction.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_bad_model_arguments() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        Autoencoder(kind="ae", size=100, latent_dim=8)
    with pytest.raises(ConfigError, match="--kind"):
        Autoencoder(kind="gan", size=64, latent_dim=8)


# ---------------------------------------------------------------- the training task


def run_autoencode(dataset: str, out: Path, kind: str, **changes: Any) -> dict[str, Any]:
    return train_autoencode(ae_config(dataset, out, kind, **changes))


def ae_config(dataset: str, out: Path, kind: str, **changes: Any) -> AutoencodeConfig:
    base: dict[str, Any] = dict(
        dataset=dataset, out=str(out), kind=kind, size=64, batch_size=4, latent_dim=8,
        epochs=3, steps_per_epoch=4, workers=0, lr=3e-3, beta=1.0, kl_anneal_steps=6,
    )  # fmt: skip
    return AutoencodeConfig(**{**base, **changes})


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_training_lowers_the_loss_and_draws_reconstructions(tmp_path: Path, dataset, kind) -> None:
    result = run_autoencode(dataset.url, tmp_path / "run", kind)
    rows = metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # the ELBO with the full β for the VAE
    if kind == "vae":
        assert len(rows[-1]["val_kl_per_dim"]) == 8
        assert sum(rows[-1]["val_kl_per_dim"]) == pytest.approx(rows[-1]["val_kl"], rel=1e-3)
        assert 0 <= rows[-1]["val_active_dims"] <= 8
    else:
        assert rows[-1]["val_kl"] == 0.0
        assert rows[-1]["val_psnr"] > rows[0]["val_psnr"]
    # Unlabelled rows are trained on: the pinned training rows keep them.
    pinned = pq.read_table(tmp_path / "run" / "rows" / "train.parquet")
    assert pinned.num_rows == 32 and pinned.column("has_ptx").null_count == 2
    png = cv2.imdecode(
        np.frombuffer((tmp_path / "run" / "reconstructions.png").read_bytes(), np.uint8), 0
    )
    assert png is not None and png.shape[1] > png.shape[0]  # two rows of eight
    assert result["reconstructions"].endswith("reconstructions.png")
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["task"] == "autoencode" and best["model_args"]["kind"] == kind


class Crash(Exception):
    pass


def test_a_resumed_vae_run_draws_the_same_noise(tmp_path: Path, dataset) -> None:
    """The VAE samples its latent code from the global generator on every training step:
    a resume must restore that generator to reproduce the uninterrupted run."""
    whole = run_autoencode(dataset.url, tmp_path / "whole", "vae", epochs=2, checkpoint_every=3)

    def crash(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 5:  # last.pt holds step 4
            raise Crash

    cfg = ae_config(dataset.url, tmp_path / "broken", "vae", epochs=2, checkpoint_every=3)
    with pytest.raises(Crash):
        train_autoencode(cfg, progress=crash)
    resumed = train_autoencode(cfg)
    assert resumed["step"] == whole["step"] == 8
    for key in ("val_loss", "val_kl", "val_mse"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key
