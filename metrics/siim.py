"""The SIIM-ACR score (the mean over images of per-image Dice) and the post-processing
triplet that turns probabilities into the masks it scores, with the triplet's grid search.

This is the one definition of the metric and of the triplet in pneumo: the training loop's
validation, the post-processing search at the end of a segmentation run, ``pneumo
evaluate`` and ``pneumo predict`` all call it.

Per image, with P the predicted and T the true foreground pixels:

* ``2|P∩T| / (|P| + |T|)`` when either is non-empty;
* ``1`` when both are empty (a correctly empty prediction is a perfect score).

So predicting one stray pixel on a healthy image scores 0 for that image. This is **not**
MONAI's ``DiceMetric(ignore_empty=True)`` nor nnU-Net's default, which drop empty/empty
images; on a 22%-positive split an all-empty prediction scores about 0.78 here.

Predictions and truths may be numpy arrays or torch tensors (``[N, H, W]`` or
``[N, 1, H, W]``, bool or 0/1). With tensors the pixel counting happens on their device
and only three numbers per image come back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def overlap_counts(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image ``(intersection, predicted area, true area)`` pixel counts, int64 ``[N]``.

    Args:
        pred: predicted masks ``[N, ...]`` (non-zero = foreground), numpy or torch.
        truth: true masks of the same shape.
    """
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ")
    n = pred.shape[0]
    p = pred.reshape(n, -1) != 0
    t = truth.reshape(n, -1) != 0
    return _host((p & t).sum(1)), _host(p.sum(1)), _host(t.sum(1))


def areas(mask: Any) -> np.ndarray:
    """Foreground pixels per image of masks ``[N, ...]``, int64 ``[N]`` (numpy or torch)."""
    return _host((mask.reshape(mask.shape[0], -1) != 0).sum(1))


def _host(counts: Any) -> np.ndarray:
    """Counts as an int64 numpy array; a torch tensor is counted on its device first."""
    if hasattr(counts, "cpu"):
        counts = counts.cpu().numpy()
    return np.asarray(counts, dtype=np.int64)


def dice_from_counts(inter: Any, pred_area: Any, true_area: Any) -> np.ndarray:
    """Per-image Dice from pixel counts; 1.0 where both areas are 0."""
    inter = np.asarray(inter, dtype=np.float64)
    total = np.asarray(pred_area, dtype=np.float64) + np.asarray(true_area, dtype=np.float64)
    out = np.ones_like(total)
    nonempty = total > 0
    out[nonempty] = 2.0 * inter[nonempty] / total[nonempty]
    return out


def dice_per_image(pred: Any, truth: Any) -> np.ndarray:
    """Per-image SIIM Dice, float64 ``[N]``: empty/empty = 1, empty vs non-empty = 0."""
    return dice_from_counts(*overlap_counts(pred, truth))


def siim_summary(dice: np.ndarray, true_area: np.ndarray) -> dict[str, float | int]:
    """The competition score and its informative part.

    Returns:
        ``dice`` (mean over all images: the SIIM score), ``dice_pos`` (mean over images
        with a true mask; NaN when there is none), ``dice_neg`` (the fraction of healthy
        images predicted empty), ``empty_dice`` (the score of predicting nothing at all on
        the same images: the baseline to beat), ``n_images``, ``n_positive``.
    """
    dice = np.asarray(dice, dtype=np.float64)
    positive = np.asarray(true_area) > 0
    return {
        "dice": float(dice.mean()) if dice.size else float("nan"),
        "dice_pos": float(dice[positive].mean()) if positive.any() else float("nan"),
        "dice_neg": float(dice[~positive].mean()) if (~positive).any() else float("nan"),
        "empty_dice": float((~positive).mean()) if dice.size else float("nan"),
        "n_images": int(dice.size),
        "n_positive": int(positive.sum()),
    }


# --- post-processing: probabilities -> the masks that are scored ------------------------

# min_area is counted in pixels of a 1024x1024 image (SIIM's size, the unit the 1st-place
# numbers use) and scaled to the pixel count of the map it is applied to.
REFERENCE_PIXELS = 1024 * 1024
TOP_THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
MIN_AREAS = (0, 250, 500, 1000, 1500, 2000, 3000, 4000, 6000)
MASK_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class PostProcess:
    """The SIIM 1st-place "triplet" (sneddy/pneumothorax-segmentation, TripletSubmit.py).

    An image is called positive when at least ``min_area`` pixels have a probability above
    ``top_threshold`` (the confident core must be big enough); a positive image's mask is
    then every pixel above the lower ``mask_threshold`` (the full extent of the region).
    Otherwise the mask is empty. ``PostProcess(0.5, 0, 0.5)`` is a plain 0.5 threshold.

    The triplet is applied to probabilities at each image's full resolution (see
    :mod:`pneumo.training.fullres`), so for SIIM's 1024x1024 images ``min_area`` is counted in
    full-resolution pixels.

    Attributes:
        top_threshold: probability a pixel needs to count towards calling the image positive.
        min_area: pixels (of a 1024x1024 image; scaled to the map's size) above
            ``top_threshold`` needed to call the image positive.
        mask_threshold: probability threshold of the output mask of a positive image.
        tta: whether the probabilities it was chosen on were flip-TTA averages; it is
            applied with the same setting (a triplet fits the probabilities it was searched
            on, and flip-averaged maps are smoother and less extreme).
    """

    top_threshold: float = 0.5
    min_area: int = 0
    mask_threshold: float = 0.5
    tta: bool = False

    def __post_init__(self) -> None:
        for name in ("top_threshold", "mask_threshold"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {self.min_area}")
        if not isinstance(self.tta, bool):
            raise ValueError(f"tta must be true or false, got {self.tta!r}")

    def apply(self, prob: Any) -> Any:
        """Bool mask(s) from probability map(s) ``[H, W]`` or ``[N, H, W]``.

        Numpy arrays give numpy masks, torch tensors give tensors on their device. A pixel
        counts when its probability is strictly above a threshold, as in the search.
        """
        if not hasattr(prob, "cpu"):
            prob = np.asarray(prob)
        scale = prob.shape[-1] * prob.shape[-2] / REFERENCE_PIXELS
        top_area = (prob > self.top_threshold).sum(axis=(-2, -1))
        positive = top_area >= self.min_area * scale
        return (prob > self.mask_threshold) & positive[..., None, None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "top_threshold": self.top_threshold,
            "min_area": self.min_area,
            "mask_threshold": self.mask_threshold,
            "tta": self.tta,
            "min_area_unit": "pixels of a 1024x1024 image",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PostProcess:
        """The triplet of :meth:`to_dict`; without ``tta`` (older runs): searched without."""
        return cls(
            float(d["top_threshold"]),
            int(d["min_area"]),
            float(d["mask_threshold"]),
            bool(d.get("tta", False)),
        )


class PostProcessSearch:
    """Grid search of the triplet maximising mean SIIM Dice, fed batch by batch.

    Only pixel counts are kept per image (areas above each top threshold, overlaps at each
    mask threshold), never the probability maps, so a whole validation split fits in a
    few kilobytes per image whatever the resolution.
    """

    def __init__(
        self,
        top_thresholds: tuple[float, ...] = TOP_THRESHOLDS,
        min_areas: tuple[int, ...] = MIN_AREAS,
        mask_thresholds: tuple[float, ...] = MASK_THRESHOLDS,
        *,
        tta: bool = False,
    ) -> None:
        self.tops, self.areas, self.masks = top_thresholds, min_areas, mask_thresholds
        self.tta = tta  # recorded in the triplet found: the maps it is fed were TTA averages
        self._top_area: list[np.ndarray] = []  # [B, T] per batch
        self._inter: list[np.ndarray] = []  # [B, M]
        self._pred_area: list[np.ndarray] = []  # [B, M]
        self._true_area: list[np.ndarray] = []  # [B]
        self._scale: list[np.ndarray] = []  # [B]

    def add(self, probs: Any, truths: Any) -> None:
        """Count one batch: probabilities and true masks ``[B, H, W]`` (numpy or torch)."""
        n = probs.shape[0]
        probs, truths = probs.reshape(n, *probs.shape[-2:]), truths.reshape(n, *probs.shape[-2:])
        tops = [areas(probs > t) for t in self.tops]
        per_mask = [overlap_counts(probs > m, truths) for m in self.masks]
        self._top_area.append(np.stack(tops, axis=1))
        self._inter.append(np.stack([c[0] for c in per_mask], axis=1))
        self._pred_area.append(np.stack([c[1] for c in per_mask], axis=1))
        self._true_area.append(per_mask[0][2])
        self._scale.append(np.full(n, probs.shape[-1] * probs.shape[-2] / REFERENCE_PIXELS))

    @classmethod
    def merged(cls, parts: list[PostProcessSearch]) -> PostProcessSearch:
        """One search over the images of all ``parts`` (e.g. gathered from every rank)."""
        out = cls(parts[0].tops, parts[0].areas, parts[0].masks, tta=parts[0].tta)
        for part in parts:
            for name in ("_top_area", "_inter", "_pred_area", "_true_area", "_scale"):
                getattr(out, name).extend(getattr(part, name))
        return out

    def scores(self) -> np.ndarray:
        """Mean Dice for every grid point, ``[T, A, M]``."""
        if not self._true_area:
            raise ValueError("no images were added to the post-processing search")
        top_area = np.concatenate(self._top_area)[:, :, None, None]  # [N, T, 1, 1]
        inter = np.concatenate(self._inter)[:, None, None, :]  # [N, 1, 1, M]
        pred_area = np.concatenate(self._pred_area)[:, None, None, :]
        true_area = np.concatenate(self._true_area)[:, None, None, None]
        scale = np.concatenate(self._scale)[:, None, None, None]
        min_area = np.asarray(self.areas, dtype=np.float64)[None, None, :, None]
        positive = top_area >= min_area * scale  # [N, T, A, 1]
        kept = dice_from_counts(inter, pred_area, true_area)  # [N, 1, 1, M]
        dropped = (true_area == 0).astype(np.float64)  # empty prediction: 1 iff truth empty
        return np.where(positive, kept, dropped).mean(axis=0)

    def best(self) -> tuple[PostProcess, float]:
        """The best triplet and its mean Dice (ties: the first in grid order)."""
        scores = self.scores()
        t, a, m = np.unravel_index(int(np.argmax(scores)), scores.shape)
        triplet = PostProcess(
            float(self.tops[t]), int(self.areas[a]), float(self.masks[m]), tta=self.tta
        )
        return triplet, float(scores[t, a, m])


def search(probs: Any, truths: Any) -> PostProcess:
    """The triplet maximising mean SIIM Dice of ``probs`` against ``truths`` ``[N, H, W]``."""
    finder = PostProcessSearch()
    finder.add(probs, truths)
    return finder.best()[0]
