"""Encoder transfer: a classifier's trunk (or any ResNet state dict) into the U-Net's encoder,
and the init chain that records where the weights came from.

``--encoder-init`` names one of:

* a ``pneumo train classify`` RUN (folder or ``s3://`` prefix): its ``checkpoints/best.pt``;
* one of our checkpoint files or objects (any task: its ``model`` state dict);
* a plain torchvision or timm ResNet state dict (or one held under ``"model"`` or
  ``"state_dict"``, as other code's checkpoints hold it).

Wrapper prefixes (``module.``, ``encoder.``, ``backbone.``...) and the classification head
(``fc.``...) are stripped; an RGB first convolution is summed into a grey one (warned);
anything else that does not fit is one error naming the keys (:mod:`pneumo.training.model`).

The init chain of the new model starts with the source: its URL, the SHA-256 of its weights
(:func:`pneumo.training.checkpoint.weights_sha256`) and, for our checkpoints, its task, step and
architecture, followed by the source's own chain, back to ``random``. A foreign state dict
ends the chain: where it came from is not recorded in it.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pneumo.shards.errors import PneumoError, StoreError
from pneumo.shards.store import is_s3_url, open_store, read_url
from pneumo.training.checkpoint import BEST, FORMAT, weights_sha256
from pneumo.training.model import (
    EncoderWeightsError,
    LoadReport,
    load_encoder_state,
    strip_state_dict,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Weights:
    """Weights read from a source, before any stripping.

    Attributes:
        url: the file or object read (a RUN resolved to its best.pt).
        state: the state dict as stored (prefixes and head still in).
        chain: the init chain of a model initialised from these weights.
    """

    url: str
    state: dict[str, torch.Tensor]
    chain: list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class EncoderInit:
    """What :func:`load_encoder_weights` did: the keys, and the new model's init chain."""

    report: LoadReport
    chain: list[dict[str, Any]]


def resolve(source: str) -> str:
    """The file or object to read for ``source``: a RUN becomes its ``checkpoints/best.pt``.

    Raises:
        EncoderWeightsError: a folder that holds no finished run.
    """
    if is_s3_url(source):
        try:
            store = open_store(source, create=False)
            if store.exists(BEST):
                return store.url_of(BEST)
        except StoreError:
            pass  # not a prefix of a reachable bucket: read_url says why below
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / BEST).is_file():
            raise EncoderWeightsError(
                f"{source} is a folder without {BEST}: give a classify RUN that finished "
                "an epoch, or a weights file"
            )
        return str((path / BEST).resolve())
    return str(path.resolve()) if path.exists() else source


def read_weights(source: str) -> Weights:
    """The weights a source names, and the init chain they carry.

    Raises:
        EncoderWeightsError: it cannot be read or holds no state dict.
        StoreError: it does not exist.
    """
    url = resolve(source)
    try:
        obj = torch.load(io.BytesIO(read_url(url)), map_location="cpu", weights_only=True)
    except PneumoError:
        raise
    except Exception as e:  # torch.load raises pickle/zip/runtime errors of many kinds
        raise EncoderWeightsError(f"cannot load {url} as a torch state dict: {e}") from e
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state = obj["model"]
        link = {
            "source": url,
            "sha256": weights_sha256(state),
            "task": obj.get("task"),
            "step": obj.get("step"),
            "model_args": obj.get("model_args"),
        }
        return Weights(url=url, state=state, chain=[link, *obj.get("init", [])])
    for key in ("model", "state_dict"):  # other code's checkpoints (lightning's...)
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise EncoderWeightsError(f"{url} holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    return Weights(url=url, state=state, chain=[{"source": url, "sha256": weights_sha256(state)}])


def load_encoder_weights(model: nn.Module, source: str) -> EncoderInit:
    """Load the ResNet weights ``source`` names into ``model.encoder`` (a U-Net's).

    Raises:
        EncoderWeightsError: unreadable, or keys/shapes that do not fit the encoder.
        StoreError: the source does not exist.
    """
    weights = read_weights(source)
    report = load_encoder_state(model.encoder, strip_state_dict(weights.state, weights.url), source)
    log.info(
        "encoder weights from %s: %d tensors loaded, adapted %s",
        weights.url,
        len(report.loaded),
        report.adapted or "none",
    )
    if report.unexpected:
        log.warning("keys of %s not used by the encoder: %s", weights.url, report.unexpected[:10])
    return EncoderInit(report=report, chain=weights.chain)
