"""The SIIM metric exactly: every image scored at its stored mask's full resolution.

SIIM scored 1024x1024 masks, while a model trained at 512 (or 128) predicts maps of that
size. Scoring at the training size overstates the metric (a model perfect at 512, upsampled,
scores 0.979 Dice on the 2,669 real positive masks at 1024; at 128, 0.924). So
wherever a figure is reported, each image's probability map is upsampled to the image's
stored size by :func:`upsample` (the very function ``pneumo predict`` uses before writing
its RLE), post-processed there (``min_area`` then counts full-resolution pixels), and
compared with the stored full-size mask, ``KEY.mask.png`` in the shard
(:class:`FullResMasks`).

Used by the post-processing search at the end of training (:func:`choose_postprocess`) and
by ``pneumo evaluate``. Validation during training stays at the training size (quick,
for choosing the best epoch); ``metrics.jsonl`` says so in its field names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from pneumo.metrics.siim import PostProcess, PostProcessSearch, overlap_counts
from pneumo.shards import stream
from pneumo.shards.errors import PneumoError
from pneumo.shards.store import open_store
from pneumo.training.model import predict_proba
from pneumo.training.runs import DistEnv, autocast, gather, images_to

log = logging.getLogger(__name__)

# The best triplet for each TTA setting with its val Dice, written next to postprocess.json
# (which holds the better of the two), so `evaluate --tta` / `--no-tta` each apply a
# triplet searched on probabilities made the same way.
SEARCH_FILE = "postprocess_search.json"


class MaskError(PneumoError):
    """A sample's full-size mask is missing, unreadable or of the wrong size."""


def upsample(prob: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A ``[H, W]`` probability map at ``size = (rows, cols)``: bilinear, float32.

    The one way pneumo brings a prediction to an image's own size (``predict``, ``evaluate``
    and the post-processing search all call it), so all three see the same maps.
    """
    rows, cols = int(size[0]), int(size[1])
    prob = prob.float()
    if tuple(prob.shape[-2:]) == (rows, cols):
        return prob
    return F.interpolate(prob[None, None], size=(rows, cols), mode="bilinear")[0, 0]


class FullResMasks:
    """The stored full-size masks of selected manifest rows, read from their shards.

    A healthy sample's mask is all zero and is not read. A positive sample's shard is read
    the first time one of its keys is asked for, and the mask PNGs (a few KB each, not the
    images) of all its selected positives are kept, so each shard is read at most once.

    Args:
        dataset: the DATASET (folder or s3://) the rows come from.
        rows: manifest rows with at least ``key``, ``shard``, ``image_id``, ``has_ptx``.
    """

    def __init__(self, dataset: str, rows: pa.Table) -> None:
        self.store = open_store(dataset, create=False)
        self.entries = {e.key: e for e in stream.entries_from_table(rows)}
        self._png: dict[str, bytes] = {}
        self._read: set[str] = set()

    def get(self, key: str, size: Sequence[int]) -> np.ndarray:
        """The bool mask ``[rows, cols]`` of sample ``key``, whose image is ``size``.

        Raises:
            MaskError: unknown or unlabelled key; a positive without a readable mask of
                the image's size.
        """
        entry = self.entries.get(key)
        if entry is None:
            raise MaskError(f"sample {key} is not among the selected rows")
        where = f"sample {key} of {self.store.url_of(entry.shard)}"
        if entry.has_ptx is None:
            raise MaskError(f"{where} is unlabelled: select labelled rows (has_ptx is not None)")
        shape = (int(size[0]), int(size[1]))
        if not entry.has_ptx:
            return np.zeros(shape, bool)
        if entry.shard not in self._read:
            self._read_shard(entry.shard)
        if key not in self._png:
            raise MaskError(f"{where} is positive but has no mask.png: re-run its ingest")
        mask = cv2.imdecode(np.frombuffer(self._png[key], np.uint8), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise MaskError(f"{where}: mask.png is not a PNG cv2 can read")
        if mask.shape != shape:
            raise MaskError(f"{where}: mask is {mask.shape}, its image {shape}")
        return mask > 0

    def _read_shard(self, shard: str) -> None:
        wanted = {k: e for k, e in self.entries.items() if e.shard == shard and e.has_ptx}
        for sample in stream.read_shard(self.store, shard, wanted):
            if "mask.png" in sample:
                self._png[sample["__key__"]] = sample["mask.png"]
        self._read.add(shard)


def _maps_and_truths(
    probs: torch.Tensor, batch: dict[str, Any], masks: FullResMasks
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Per image of ``batch``: its probability map and true mask, both at full size."""
    for key, prob, size in zip(batch["key"], probs, batch["orig_size"], strict=True):
        truth = torch.from_numpy(masks.get(key, size)).to(prob.device)
        yield upsample(prob, size), truth


def score_batch(
    probs: torch.Tensor, batch: dict[str, Any], masks: FullResMasks, post: PostProcess
) -> dict[str, list[Any]]:
    """Full-resolution counts of one batch, post-processed with ``post``.

    Args:
        probs: probabilities ``[B, H, W]`` at the model's size, any device.
        batch: the loader's batch (``key`` and ``orig_size`` are used).
        masks: the true masks of the batch's samples.
        post: the triplet, applied at full resolution.

    Returns:
        Lists over the batch: ``inter``, ``pred_area``, ``true_area`` (full-size pixels) and
        ``max_prob`` (the image's highest probability at full size).
    """
    out: dict[str, list[Any]] = {"inter": [], "pred_area": [], "true_area": [], "max_prob": []}
    for full, truth in _maps_and_truths(probs, batch, masks):
        counts = overlap_counts(post.apply(full)[None], truth[None])
        for name, value in zip(("inter", "pred_area", "true_area"), counts, strict=True):
            out[name].append(int(value[0]))
        out["max_prob"].append(float(full.max()))
    return out


def add_to_search(
    search: PostProcessSearch, probs: torch.Tensor, batch: dict[str, Any], masks: FullResMasks
) -> None:
    """Feed one batch to ``search`` at full resolution (image by image: sizes may differ)."""
    for full, truth in _maps_and_truths(probs, batch, masks):
        search.add(full[None], truth[None])


def choose_postprocess(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    masks: FullResMasks,
    *,
    device: torch.device,
    amp: bool,
    env: DistEnv,
) -> dict[bool, tuple[PostProcess, float]]:
    """The best triplet and its mean full-resolution Dice, with and without flip TTA.

    Every rank feeds its share of the batches; the pixel counts (never the maps) are
    gathered, so every rank returns the same result. The caller sets the weights.

    Returns:
        ``{False: (triplet, dice), True: (triplet, dice)}``, keyed by TTA.
    """
    searches = {tta: PostProcessSearch(tta=tta) for tta in (False, True)}
    model.eval()
    with torch.no_grad():
        for batch in batches:
            images = images_to(device, batch["image"])
            for tta, search in searches.items():
                with autocast(device, amp):
                    probs = predict_proba(model, images, tta=tta)
                add_to_search(search, probs[:, 0], batch, masks)
    parts = gather(env, searches)
    out = {}
    for tta in (False, True):
        out[tta] = PostProcessSearch.merged([part[tta] for part in parts]).best()
        log.info("post-processing with TTA %s: %s, val dice %.4f", tta, *out[tta])
    return out


def better(results: dict[bool, tuple[PostProcess, float]]) -> tuple[PostProcess, float]:
    """The higher-scoring of :func:`choose_postprocess`'s results; a tie keeps no TTA
    (half the inference cost for the same score)."""
    plain, flipped = results[False], results[True]
    return flipped if flipped[1] > plain[1] else plain


def search_record(results: dict[bool, tuple[PostProcess, float]]) -> dict[str, Any]:
    """The JSON of :data:`SEARCH_FILE`: the best triplet per TTA setting, with its Dice."""
    return {
        "resolution": "full",  # each image's stored size
        "by_tta": [{**post.to_dict(), "val_dice": dice} for post, dice in results.values()],
    }
