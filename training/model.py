"""The segmentation network (a U-Net on a ResNet-34 encoder) and its encoder initialisation.

Models are built offline (``encoder_weights=None``): pretrained weights come only from a
file or object the user names (:func:`load_encoder_weights`), for instance the ResNet-34 a
``pneumo train classify`` run produced on NIH ChestX-ray14, or a torchvision/timm
ImageNet state dict saved beforehand.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import segmentation_models_pytorch as smp
import torch
from torch import nn

from shards.errors import PneumoError
from shards.store import read_url

log = logging.getLogger(__name__)

# Prefixes other training code puts before encoder keys: our classifier ("encoder." or
# "model."), DDP ("module."), timm/lightning-style wrappers ("backbone."). Stripped repeatedly,
# so "module.encoder.layer1..." works too.
_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "_orig_mod.")
# Keys of a classification head, never part of the encoder.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")


class EncoderWeightsError(PneumoError):
    """Encoder weights cannot be loaded: unreadable file, or no key matches the encoder."""


def build_unet(in_channels: int = 1, encoder: str = "resnet34") -> smp.Unet:
    """A U-Net with one output channel (pneumothorax logits), randomly initialised.

    Args:
        in_channels: image channels (1 for grey radiographs).
        encoder: an smp encoder name (``"resnet34"``, the report's choice).
    """
    return smp.Unet(encoder, encoder_weights=None, in_channels=in_channels, classes=1)


@dataclass(frozen=True, kw_only=True)
class LoadReport:
    """What :func:`load_encoder_weights` did, key by key."""

    loaded: list[str]
    missing: list[str]  # encoder keys the source did not have (kept at their init values)
    unexpected: list[str]  # source keys the encoder has no use for (head keys excluded)
    adapted: list[str]  # keys whose shape was adapted (first conv: 3 -> in_channels)


def load_encoder_weights(model: smp.Unet, source: str) -> LoadReport:
    """Load a ResNet state dict from a local file or ``s3://`` object into the encoder.

    Accepted: a plain torchvision or timm ResNet state dict; a checkpoint dict holding one
    under ``"model"`` or ``"state_dict"`` (our classifier checkpoints, lightning); keys
    prefixed by ``encoder.``, ``model.``, ``module.`` or ``backbone.``. Classification-head
    keys (``fc.*``) are dropped. A 3-channel first convolution is summed over its input
    channels for a 1-channel encoder (as smp does for pretrained weights).

    Raises:
        EncoderWeightsError: the source cannot be read, no key matches the encoder, or a
            matching key has an incompatible shape.
    """
    try:
        blob = read_url(source)
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except PneumoError:
        raise
    except Exception as e:  # torch.load raises pickle/zip/runtime errors of many kinds
        raise EncoderWeightsError(f"cannot load {source} as a torch state dict: {e}") from e
    report = _load_state(model.encoder, _state_dict_of(obj, source), source)
    log.info(
        "encoder weights from %s: %d loaded, %d missing, %d unexpected, adapted %s",
        source,
        len(report.loaded),
        len(report.missing),
        len(report.unexpected),
        report.adapted or "none",
    )
    if report.missing:
        log.warning("encoder keys not in %s (left at init): %s", source, report.missing[:10])
    if report.unexpected:
        log.warning("keys of %s not used by the encoder: %s", source, report.unexpected[:10])
    return report


def _state_dict_of(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded object, with wrapper prefixes stripped."""
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


def _load_state(encoder: nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    target = encoder.state_dict()
    loaded, adapted, mismatched = [], [], []
    for name, value in state.items():
        if name not in target:
            continue
        want = target[name].shape
        if value.shape != want:
            value = _adapt_first_conv(value, want)
            if value is None:
                mismatched.append(f"{name}: {tuple(state[name].shape)} vs {tuple(want)}")
                continue
            adapted.append(name)
        target[name] = value.to(target[name].dtype)
        loaded.append(name)
    if mismatched:
        raise EncoderWeightsError(
            f"{source}: {len(mismatched)} tensor(s) have the wrong shape for the "
            f"{type(encoder).__name__} encoder (another architecture?): {mismatched[:5]}"
        )
    weights = [n for n in loaded if not n.endswith("num_batches_tracked")]
    if not weights:
        raise EncoderWeightsError(
            f"{source}: none of its {len(state)} tensor key(s) match the encoder "
            f"(first keys: {sorted(state)[:5]}; expected e.g. {list(target)[:3]})"
        )
    encoder.load_state_dict(target)
    return LoadReport(
        loaded=loaded,
        missing=sorted(set(target) - set(loaded)),
        unexpected=sorted(set(state) - set(target)),
        adapted=adapted,
    )


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
    probs = torch.sigmoid(model(images).float())
    if tta:
        flipped = torch.sigmoid(model(torch.flip(images, dims=[-1])).float())
        probs = (probs + torch.flip(flipped, dims=[-1])) / 2
    return probs
