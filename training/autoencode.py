"""``pneumo train autoencode``: a convolutional autoencoder or β-VAE, a task of the shared loop.

This file owns what is particular to autoencoding; :mod:`pneumo.training.loop` owns the rest
(processes, pinned rows, resume, checkpoints, ``metrics.jsonl``, curves, GPU settings).
Read top to bottom:

1. the config: the train split of every dataset, *unlabelled rows included* (nothing here
   reads a label), validated on the val split; 256 px, batch 32, Adam at 1e-4;
2. the model (:mod:`pneumo.training.autoencoders`): ``ae`` or ``vae`` with ``latent_dim`` codes;
3. the step: binary cross-entropy on the logits against the image in [0, 1], summed over
   pixels; for the VAE plus β x w(step) x KL summed over latent dimensions, both averaged
   over the batch, w annealed from 0 to 1 over ``kl_anneal_steps`` (default: a quarter of
   the run);
4. validation (the decoder sees ``mu``): the loss with the full β (``val_loss``, which
   picks ``best.pt``), its reconstruction and KL terms, MSE and PSNR, and for the VAE the
   KL of every latent dimension (``val_kl_per_dim``) and how many carry information
   (``val_active_dims``: KL above 0.01 nats; collapsed dimensions sit at 0);
5. the end: ``RUN/reconstructions.png``, a fixed set of validation images (the first by
   key) above their reconstructions by the best weights, the report's Figure 1.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pneumo.shards import selections
from pneumo.shards.errors import ConfigError
from pneumo.training import checkpoint as ckpts
from pneumo.training import loop
from pneumo.training.autoencoders import (
    Autoencoder,
    autoencoder_loss,
    check_model_args,
    kl_weight,
    model_args,
)
from pneumo.training.data import eval_batches
from pneumo.training.job import Job, Progress
from pneumo.training.runs import LR_PANEL, Panel, as_float, images_to
from pneumo.training.task import RunConfig, Task

log = logging.getLogger(__name__)

RECONSTRUCTIONS_FILE = "reconstructions.png"
N_SHOWN = 8  # validation images in reconstructions.png
ACTIVE_KL = 0.01  # nats: a latent dimension with less KL carries (almost) nothing


@dataclass(frozen=True, kw_only=True)
class AutoencodeConfig(RunConfig):
    """An autoencoder run; the shared settings are :class:`pneumo.training.task.RunConfig`'s.

    Attributes:
        kind: ``ae`` (plain autoencoder, BCE) or ``vae`` (β-VAE, ELBO).
        latent_dim: length of the code (the VAE's ``mu``), what ``pneumo embed`` writes.
        beta: the KL's weight in the ELBO (1: the plain VAE).
        kl_anneal_steps: steps over which the KL weight grows from 0 to ``beta``; None: a
            quarter of the run; 0: no annealing.
        lr: Adam's learning rate.
    """

    kind: str
    where: str = selections.TRAIN
    val_where: str = selections.VAL
    size: int = 256
    batch_size: int = 32
    latent_dim: int = 128
    beta: float = 4.0
    kl_anneal_steps: int | None = None
    lr: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_model_args(
            kind=self.kind, size=self.size, latent_dim=self.latent_dim, in_channels=self.in_channels
        )
        if self.beta < 0 or not self.lr > 0:
            raise ConfigError("--beta must be >= 0 and --lr > 0")
        if self.kl_anneal_steps is not None and self.kl_anneal_steps < 0:
            raise ConfigError("--kl-anneal-steps must not be negative")


class AutoencodeTask(Task):
    """Reconstruct the image; the loop does the rest."""

    name = "autoencode"
    best = ("val_loss", "min")
    headline = ("train_loss", "val_loss", "val_psnr", "val_kl", "val_active_dims")
    panels = (
        Panel(
            "loss per image",
            (
                ("train_loss", "training: BCE + β·w·KL (w annealed)"),
                ("val_loss", "validation: BCE + β·KL"),
            ),
        ),
        Panel("reconstruction", (("val_psnr", "validation PSNR, dB"),)),
        Panel("KL", (("val_kl", "validation KL, nats per image (VAE)"),)),
        LR_PANEL,
    )
    schedule_on = None  # a constant learning rate

    cfg: AutoencodeConfig

    def model_args(self) -> dict[str, Any]:
        cfg = self.cfg
        return model_args(cfg.kind, cfg.size, cfg.latent_dim, cfg.in_channels)

    def build_model(self) -> Autoencoder:
        cfg = self.cfg
        return Autoencoder(
            kind=cfg.kind, size=cfg.size, latent_dim=cfg.latent_dim, in_channels=cfg.in_channels
        )

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.cfg.lr)

    def kl_weight(self, job: Job) -> float:
        steps = self.cfg.kl_anneal_steps
        return kl_weight(job.step, job.total // 4 if steps is None else steps)

    def loss(self, job: Job, batch: dict[str, Any]) -> torch.Tensor:
        x = images_to(job.device, batch["image"])  # the target too: no label is read
        logits, mu, logvar = job.net(x)
        weight = self.kl_weight(job)
        return autoencoder_loss(logits, x, mu, logvar, beta=self.cfg.beta, weight=weight).loss

    def validate(self, job: Job, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """This rank's sums: reconstruction, KL (total and per dimension), squared error."""
        sums = {"reconstruction": 0.0, "kl": 0.0, "squared_error": 0.0, "pixels": 0, "n": 0}
        per_dim = np.zeros(self.cfg.latent_dim)
        for batch in batches:
            x = images_to(job.device, batch["image"])
            logits, mu, logvar = job.model(x)
            out = autoencoder_loss(logits, x, mu, logvar, beta=self.cfg.beta)
            n = len(x)
            sums["reconstruction"] += float(out.reconstruction) * n
            sums["kl"] += float(out.kl) * n
            error = torch.sigmoid(logits.float()) - x.float()
            sums["squared_error"] += float(error.pow(2).sum())
            sums["pixels"] += x.numel()
            sums["n"] += n
            if out.kl_per_dim is not None:
                per_dim += out.kl_per_dim.cpu().numpy() * n
        return {**sums, "kl_per_dim": per_dim.tolist()}

    def summarise(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        n = sum(p["n"] for p in parts)
        if n == 0:
            return {"loss": float("nan"), "n_images": 0}
        reconstruction = sum(p["reconstruction"] for p in parts) / n
        kl = sum(p["kl"] for p in parts) / n
        mse = sum(p["squared_error"] for p in parts) / sum(p["pixels"] for p in parts)
        out = {
            "loss": reconstruction + self.cfg.beta * kl,
            "reconstruction": reconstruction,
            "kl": kl,
            "mse": mse,
            "psnr": 10.0 * float(np.log10(1.0 / max(mse, 1e-12))),
            "n_images": n,
        }
        if self.cfg.kind == "vae":
            per_dim = np.sum([p["kl_per_dim"] for p in parts], axis=0) / n
            out["kl_per_dim"] = [round(float(v), 5) for v in per_dim]
            out["active_dims"] = int((per_dim > ACTIVE_KL).sum())
        return out

    def finish(self, job: Job) -> dict[str, Any]:
        """``reconstructions.png`` from the best weights (rank 0)."""
        if not job.env.is_main:
            return {}
        model = self.build_model()
        model.load_state_dict(ckpts.load_checkpoint(self.cfg.out, "best")["model"])
        model.to(job.device).eval()
        shown = sorted(job.val_entries, key=lambda e: e.key)[:N_SHOWN]
        loader = self.loader(train=False)
        batch = next(iter(eval_batches(loader, rank=0, world_size=1, entries=shown)))
        with torch.no_grad():
            logits = model(images_to(job.device, batch["image"]))[0]
        images = as_float(batch["image"])[:, 0].numpy()
        recon = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
        job.run.put(RECONSTRUCTIONS_FILE, reconstructions_png(images, recon, batch["key"]))
        return {"reconstructions": job.run.store.url_of(RECONSTRUCTIONS_FILE)}


def reconstructions_png(images: np.ndarray, recon: np.ndarray, keys: list[str]) -> bytes:
    """Originals (top row) above their reconstructions (bottom row), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 0.4, 3.6), squeeze=False)
    for i in range(n):
        for row, pixels in enumerate((images[i], recon[i])):
            ax = axes[row][i]
            ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][i].set_title(keys[i][:12], fontsize=7)
    axes[0][0].set_ylabel("image")
    axes[1][0].set_ylabel("reconstruction")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def train_autoencode(cfg: AutoencodeConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train (or resume) an autoencoder run (see the module doc and :func:`.loop.run`).

    Returns:
        The loop's summary (``val_loss``, ``val_psnr``, ...) and ``reconstructions``.
    """
    return loop.run(AutoencodeTask(cfg), progress)
