"""The networks pneumo trains, built offline, and how a ResNet state dict fits an encoder.

* :func:`build_unet`: the segmentation U-Net on a ResNet encoder (segmentation-models-pytorch).
* :func:`build_classifier`: a torchvision ResNet with a 1-channel (or ``in_channels``) stem,
  the same module smp's ResNet encoder is, so its trunk loads into the U-Net as it is.
* :func:`build_model`: either of them from the ``model_args`` a checkpoint stores.
* :func:`load_encoder_state`: a ResNet state dict (ours, torchvision's, timm's) into an
  encoder: wrapper prefixes and the classification head stripped, an RGB first convolution
  summed into a grey one, anything else that does not fit refused by name.

Models are built with random weights (``encoder_weights=None``): pretrained weights come
only from a file or object the user names (see :mod:`pneumo.training.transfer`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torchvision
from torch import nn

from pneumo.shards.errors import PneumoError

log = logging.getLogger(__name__)

# Prefixes other training code puts before encoder keys: our classifier ("encoder." or
# "model."), DDP ("module."), timm/lightning-style wrappers ("backbone."). Stripped repeatedly,
# so "module.encoder.layer1..." works too.
_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "_orig_mod.")
# Keys of a classification head, never part of the encoder.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")
CLASSIFIER_ARCHS = ("resnet18", "resnet34", "resnet50")


class EncoderWeightsError(PneumoError):
    """Encoder weights cannot be loaded: unreadable file, or keys that do not fit."""


def build_unet(in_channels: int = 1, encoder: str = "resnet34") -> smp.Unet:
    """A U-Net with one output channel (pneumothorax logits), randomly initialised.

    Args:
        in_channels: image channels (1 for grey radiographs).
        encoder: an smp encoder name (``"resnet34"``, the report's choice).
    """
    return smp.Unet(encoder, encoder_weights=None, in_channels=in_channels, classes=1)


def build_classifier(
    backbone: str = "resnet34", in_channels: int = 1, num_classes: int = 2
) -> torchvision.models.ResNet:
    """A torchvision ResNet with ``in_channels`` input channels and ``num_classes`` logits.

    The layout (``conv1``, ``bn1``, ``layer1..4``, ``fc``) is torchvision's, which is also
    smp's ResNet encoder: without ``fc`` its state dict is a U-Net encoder's.
    """
    if backbone not in CLASSIFIER_ARCHS:
        raise EncoderWeightsError(f"backbone {backbone!r}: expected one of {CLASSIFIER_ARCHS}")
    model = getattr(torchvision.models, backbone)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # torchvision's own init of every convolution, which the new stem missed
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def unet_args(encoder: str, in_channels: int) -> dict[str, Any]:
    return {"arch": "unet", "encoder": encoder, "in_channels": in_channels}


def classifier_args(backbone: str, in_channels: int, num_classes: int) -> dict[str, Any]:
    return {
        "arch": "classifier",
        "backbone": backbone,
        "in_channels": in_channels,
        "num_classes": num_classes,
    }


def build_model(args: Mapping[str, Any]) -> nn.Module:
    """The randomly initialised network ``args`` (a checkpoint's ``model_args``) describes.

    Raises:
        EncoderWeightsError: an architecture pneumo does not know.
    """
    arch = args.get("arch")
    if arch == "unet":
        return build_unet(in_channels=args["in_channels"], encoder=args["encoder"])
    if arch == "classifier":
        return build_classifier(args["backbone"], args["in_channels"], args["num_classes"])
    raise EncoderWeightsError(f"unknown architecture {arch!r} (expected unet or classifier)")


@dataclass(frozen=True, kw_only=True)
class LoadReport:
    """What :func:`load_encoder_state` did, key by key."""

    loaded: list[str]
    unexpected: list[str]  # source keys the encoder has no use for (head keys excluded)
    adapted: list[str]  # keys whose shape was adapted (first conv: 3 -> in_channels)


def strip_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded object, wrapper prefixes and head keys removed.

    Accepted: a plain state dict, or a dict holding one under ``"model"`` or
    ``"state_dict"`` (our checkpoints, lightning's).
    """
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise EncoderWeightsError(f"{source} holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            continue
        name = str(key)
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        if not name.startswith(_HEAD_PREFIXES):
            state[name] = value
    return state


def load_encoder_state(
    encoder: nn.Module, state: dict[str, torch.Tensor], source: str
) -> LoadReport:
    """Load a stripped ResNet state dict (:func:`strip_state_dict`) into ``encoder``.

    Every encoder tensor must come from ``state``: a key missing, or a tensor of another
    shape, is an error naming the keys (a half-loaded encoder trains silently worse). The
    one adaptation is an RGB first convolution for another channel count, summed over its
    input channels for a grey encoder, as smp does for pretrained weights (warned).
    Source keys the encoder has no use for are reported and ignored.

    Raises:
        EncoderWeightsError: no key matches, keys are missing, or shapes do not fit.
    """
    target = encoder.state_dict()
    loaded, adapted, mismatched = [], [], []
    for name, value in state.items():
        if name not in target:
            continue
        want = target[name].shape
        if value.shape != want:
            value = _adapt_first_conv(value, want)
            if value is None:
                mismatched.append(f"{name} {tuple(state[name].shape)} vs {tuple(want)}")
                continue
            adapted.append(name)
        target[name] = value.to(target[name].dtype)
        loaded.append(name)
    if not [n for n in loaded if not n.endswith("num_batches_tracked")] and not mismatched:
        raise EncoderWeightsError(
            f"{source}: none of its {len(state)} tensor key(s) match the encoder "
            f"(first keys: {sorted(state)[:5]}; expected e.g. {list(target)[:3]})"
        )
    if mismatched:
        raise EncoderWeightsError(
            f"{source}: {len(mismatched)} tensor(s) have the wrong shape for the "
            f"{type(encoder).__name__} encoder (another architecture?): {mismatched[:5]}"
        )
    missing = sorted(n for n in set(target) - set(loaded) if not n.endswith("num_batches_tracked"))
    if missing:
        raise EncoderWeightsError(
            f"{source}: {len(missing)} encoder key(s) are not in it (another architecture, "
            f"e.g. resnet34d?): {missing[:5]}"
        )
    for name in adapted:
        log.warning(
            "%s: %s has %d input channels, the encoder %d: summed over channels (as smp does)",
            source, name, state[name].shape[1], target[name].shape[1],
        )  # fmt: skip
    encoder.load_state_dict(target)
    return LoadReport(loaded=loaded, unexpected=sorted(set(state) - set(target)), adapted=adapted)


def _adapt_first_conv(weight: torch.Tensor, want: torch.Size) -> torch.Tensor | None:
    """An RGB first-conv kernel for another channel count, as smp's ``patch_first_conv``."""
    if weight.ndim != 4 or weight.shape[0] != want[0] or weight.shape[2:] != want[2:]:
        return None
    have, new = weight.shape[1], want[1]
    if have != 3:
        return None
    if new == 1:
        return weight.sum(1, keepdim=True)
    # Cycle the RGB kernels over the new channels and rescale to keep activations' scale.
    idx = torch.arange(new) % have
    return weight[:, idx] * (have / new)


def predict_proba(model: nn.Module, images: torch.Tensor, *, tta: bool = False) -> torch.Tensor:
    """Foreground probabilities ``[B, 1, H, W]`` (float32) for a batch of images.

    With ``tta`` (horizontal-flip test-time augmentation, as the SIIM winners used) the
    result is the mean of the probabilities of the image and of its mirror, flipped back.
    The caller chooses ``model.eval()``, ``torch.no_grad()`` and autocast.
    """
    if not tta:
        return torch.sigmoid(model(images).float())
    plain, back = flip_pair(model, images)
    return (plain + back) / 2


def flip_pair(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground probabilities ``[B, 1, H, W]`` (float32) of the images, and of their mirror
    images flipped back: flip TTA averages the two, their disagreement is an uncertainty
    (:mod:`pneumo.evaluation.calibration`). The caller chooses no_grad and autocast."""
    plain = torch.sigmoid(model(images).float())
    mirror = torch.sigmoid(model(torch.flip(images, dims=[-1])).float())
    return plain, torch.flip(mirror, dims=[-1])
