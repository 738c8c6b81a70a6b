"""A RUN's temperature: fitted on its validation split, stored beside its checkpoints, used
by ``pneumo evaluate`` (ECE before and after, a reliability diagram) and ``pneumo predict``.

The arithmetic (bins, ECE, NLL, the fit) is :mod:`pneumo.metrics.calibration`'s; this module
keeps the record and draws the figure.

**What is calibrated.**

* classify: the softmax of the classifier's logits, ``softmax(z / T)``; for two classes
  the reliability is that of the probability of class 1 (pneumothorax).
* segment: the image-level probability of pneumothorax, which is the image's largest pixel
  probability, taken where the evaluation takes it (``max_prob``): on the run's probability
  map (flip-averaged when the run's triplet was searched with TTA), upsampled bilinearly to
  the image's full size, before the post-processing triplet (whose thresholds would set it
  to 0 on images called negative). The temperature acts on the logit of that map,
  ``sigmoid(logit(p) / T)`` pixel by pixel: without TTA that is the model's pixel logit
  divided by T; with TTA the logit of the flip-averaged probability. The map is a monotone
  function of the uncalibrated one, so the image-level probability of the calibrated map is
  its largest pixel, ``sigmoid(logit(max_prob) / T)`` exactly, and the masks (the triplet is
  applied to the uncalibrated map it was searched on) do not change.

**The record** ``RUN/calibration.json``: ``temperature``, ``fitted_on`` (``split``: always
``val``; ``where``, ``dataset``, ``n_images``), the checkpoint (name and step) and, for
segment, the TTA setting it was fitted for, and the validation NLL and ECE before and after.
A record made for another checkpoint step or TTA setting is not applied (a warning says so).

**Flip uncertainty** (:func:`flip_probabilities`): the mean over the pixels of the model's
input of ``|p(x) - flip(p(flip(x)))|``, the absolute difference between the probability map
of the image and the mirrored-back map of its mirror image. It lies in [0, 1]; it is 0 for a
flip-equivariant model (one that mirrors its output when its input is mirrored) whatever
the image, and grows as the two views disagree.
"""

from __future__ import annotations

import io
import json
import logging
import math
from typing import Any

import numpy as np
import torch

from pneumo.metrics.calibration import (
    DEFAULT_BINS,
    LOG_T_BOUNDS,
    Reliability,
    fit_temperature,
    nll,
    reliability,
)
from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.store import open_store
from pneumo.training.model import flip_pair
from pneumo.training.runs import autocast, images_to

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
FIT_SPLIT = "val"  # the only split a temperature is fitted on: never the test split


def fit_and_store(
    run: str,
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    probabilities: Any,
    fitted_on: dict[str, Any],
    model: dict[str, Any],
    n_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """Fit a temperature on validation ``logits``/``labels`` and write ``RUN/calibration.json``.

    Args:
        probabilities: ``f(logits, T) -> (probs [N], events [N])``, the view whose ECE is
            recorded (see :func:`calibration_view`).
        fitted_on: ``where``, ``dataset`` of the validation rows (``split`` is added).
        model: what the temperature belongs to: ``checkpoint``, ``step`` (and ``tta``).

    Returns:
        The record written.

    Raises:
        ConfigError: no temperature can be fitted on these rows (one class only, or all
            classified right).
    """
    try:
        temperature = fit_temperature(logits, labels)
    except ValueError as e:
        raise ConfigError(
            f"{run}: cannot fit a temperature on the {FIT_SPLIT} rows "
            f"({fitted_on.get('where')}, {len(labels)} images): {e}"
        ) from e
    if not LOG_T_BOUNDS[0] + 1e-3 < math.log(temperature) < LOG_T_BOUNDS[1] - 1e-3:
        log.warning(
            "%s: temperature %.3g is at the bound of its search: on these %d val images "
            "the probabilities carry little signal about the labels", run, temperature, len(labels),
        )  # fmt: skip
    before, after = probabilities(logits, 1.0), probabilities(logits, temperature)
    record = {
        "temperature": temperature,
        "fitted_on": {"split": FIT_SPLIT, **fitted_on, "n_images": int(len(labels))},
        **model,
        "val_nll": nll(logits, labels),
        "val_nll_calibrated": nll(logits, labels, temperature),
        "val_ece": reliability(*before, n_bins).ece,
        "val_ece_calibrated": reliability(*after, n_bins).ece,
    }
    store = open_store(run)
    store.put(CALIBRATION_FILE, (json.dumps(record, indent=2) + "\n").encode())
    log.info("%s: temperature %.4f fitted on %d val images", run, temperature, len(labels))
    return record


def load_temperature(run: str, model: dict[str, Any]) -> dict[str, Any] | None:
    """The record of ``run`` if it was fitted for ``model`` (``step``, and ``tta`` when
    given); None when there is none or it belongs to another (with a warning).

    Raises:
        StoreError: the file exists but is not a valid record.
    """
    store = open_store(run, create=False)
    if not store.exists(CALIBRATION_FILE):
        return None
    url = store.url_of(CALIBRATION_FILE)
    try:
        record = json.loads(store.get(CALIBRATION_FILE))
        temperature = float(record["temperature"])
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{url} is not a valid calibration record: {e}") from e
    if not temperature > 0:
        raise StoreError(f"{url}: temperature {temperature} is not positive")
    for key, value in model.items():
        if key in ("step", "tta") and record.get(key) != value:
            log.warning(
                "%s was fitted for %s %s, not %s: not applied (refit with --calibrate)",
                url, key, record.get(key), value,
            )  # fmt: skip
            return None
    return record


def calibration_summary(
    before: tuple[np.ndarray, np.ndarray],
    after: tuple[np.ndarray, np.ndarray] | None,
    record: dict[str, Any] | None,
    n_bins: int = DEFAULT_BINS,
) -> tuple[dict[str, Any], Reliability, Reliability | None]:
    """The summary fields of ``(probs, events)`` before and after the temperature.

    Returns:
        ``{"ece", "ece_calibrated", "temperature", "calibration_split", "ece_bins"}`` and
        the reliability bins before and after (None without a temperature).
    """
    bins_before = reliability(*before, n_bins)
    bins_after = reliability(*after, n_bins) if after is not None else None
    fields = {
        "ece": bins_before.ece,
        "ece_calibrated": bins_after.ece if bins_after is not None else None,
        "temperature": record["temperature"] if record else None,
        "calibration_split": record["fitted_on"]["split"] if record else None,
        "ece_bins": n_bins,
    }
    return fields, bins_before, bins_after


def reliability_record(before: Reliability, after: Reliability | None) -> dict[str, Any]:
    """The bins behind the reliability diagram, for the evaluation's JSON."""
    return {"before": before.to_dict(), "after": after.to_dict() if after is not None else None}


def reliability_png(before: Reliability, after: Reliability | None, title: str) -> bytes:
    """Reliability diagram: observed frequency against mean probability per bin (dots where
    a bin holds cases, before and after the temperature), the diagonal of perfect
    calibration, and the cases per bin as bars below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for bins, name, marker in ((before, "uncalibrated", "o"), (after, "temperature-scaled", "s")):
        if bins is None:
            continue
        full = bins.count > 0
        ax.plot(
            bins.confidence[full], bins.frequency[full], marker=marker,
            label=f"{name}: ECE {bins.ece:.3f}",
        )  # fmt: skip
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    width = np.diff(before.edges)
    hist.bar(before.edges[:-1], before.count, width=width, align="edge", edgecolor="white")
    hist.set_xlabel(f"predicted probability ({len(before.count)} equal-width bins)")
    hist.set_ylabel("images (uncalibrated)")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def flip_probabilities(predictor: Any, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """The predictor's probabilities ``[B, size, size]`` and the flip uncertainty ``[B]``.

    The probabilities equal ``predictor.probabilities(images)`` (the flip average when the
    predictor uses TTA, else the plain map); the uncertainty is defined in the module
    docstring. One forward pass of the image and one of its mirror.
    """
    with torch.no_grad(), autocast(predictor.device, predictor.amp):
        plain, back = flip_pair(predictor.model, images_to(predictor.device, images))
    plain, back = plain[:, 0], back[:, 0]
    uncertainty = (plain - back).abs().flatten(1).mean(dim=1).cpu().numpy().astype(np.float64)
    probs = (plain + back) / 2 if predictor.tta else plain
    return probs.float(), uncertainty
