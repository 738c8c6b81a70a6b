"""A trained segmentation run, ready to predict: weights, input size, post-processing.

``pneumo evaluate`` and ``pneumo predict`` both go through :class:`Predictor`, so an image
is preprocessed, predicted and thresholded the same way in both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pneumo.evaluation.postprocess import load_postprocess
from pneumo.metrics.siim import PostProcess
from pneumo.training.checkpoint import load_checkpoint, model_from_checkpoint
from pneumo.training.model import predict_proba
from pneumo.training.runs import autocast, images_to

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Predictor:
    """A RUN's model on the best available device, with its stored post-processing.

    Attributes:
        model: the U-Net, in eval mode.
        post: the post-processing triplet (RUN/postprocess.json).
        size: the input side the model was trained at.
        in_channels: image channels the model expects.
        device: where the model runs (the first GPU, else the CPU).
        tta: average with the horizontal mirror's prediction (as ``post`` was searched).
        amp: bf16 autocast on GPU.
        checkpoint: the checkpoint's description (everything but the weights).
    """

    model: nn.Module
    post: PostProcess
    size: int
    in_channels: int
    device: torch.device
    tta: bool
    amp: bool
    checkpoint: dict[str, Any]

    @classmethod
    def load(cls, run: str, checkpoint: str = "best", *, tta: bool | None = None) -> Predictor:
        """Load ``checkpoint`` (``best``, ``last`` or a URL) and the triplet of ``run``.

        ``tta`` None: flip TTA as the run's post-processing was chosen with; True or False:
        that setting, with the triplet searched under it.

        Raises:
            CheckpointError: no such checkpoint.
            ConfigError: the run holds no triplet searched with that TTA setting.
        """
        ckpt = load_checkpoint(run, checkpoint)
        post = load_postprocess(run, tta)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model = model_from_checkpoint(ckpt).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        config = ckpt["config"]
        described = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng")}
        log.info("%s: %s checkpoint at step %d", run, checkpoint, ckpt["step"])
        return cls(
            model=model,
            post=post,
            size=int(config["size"]),
            in_channels=int(ckpt["model_args"]["in_channels"]),
            device=device,
            tta=post.tta,
            amp=bool(config.get("amp", True)),
            checkpoint=described,
        )

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground probabilities ``[B, size, size]`` (float32, on ``device``)."""
        with torch.no_grad(), autocast(self.device, self.amp):
            probs = predict_proba(self.model, images_to(self.device, images), tta=self.tta)
        return probs[:, 0].float()
