"""Calibration of predicted probabilities: reliability bins, ECE, NLL, temperature scaling.

Pure functions on numpy arrays, shared by training's validation and by evaluation.

**Events.** A probability is calibrated when, among the cases given probability ``p``, the
event happens a share ``p`` of the time. Two views, the ones torchmetrics' binary and
multiclass calibration errors take:

* binary: ``probs [N]`` is the probability of the positive class (pneumothorax) and the
  event is ``label == 1``;
* N classes (:func:`top_label`): the probability is the top class's (the confidence) and
  the event is "the top class is right" (Guo et al., 2017). A two-class softmax is read the
  binary way (class 1), so classify and segment report the same thing for pneumothorax.

**Bins.** ``n_bins`` equal-width bins on [0, 1], closed on the right as in Guo et al. and
scikit-learn's ``calibration_curve``: bin ``m`` (1-based) holds ``(m-1)/M < p <= m/M``;
the first also holds ``p == 0``. The edges are ``k / M`` exactly (not ``linspace``'s
rounded ``k * (1/M)``), so ``p = 0.2`` with 5 bins falls in the first bin, not the second.

**ECE** (expected calibration error) is the bin-count-weighted mean gap between the
observed frequency and the mean probability of each bin::

    ECE = sum_m (n_m / N) * | freq_m - conf_m |

where ``n_m`` is the number of cases in bin ``m``, ``freq_m`` the share of them where the
event happened and ``conf_m`` their mean probability; empty bins count zero.

**Temperature scaling** (Guo et al., 2017) divides the logits by one scalar ``T > 0`` fitted
by minimising the negative log-likelihood on held-out (validation) data: ``sigmoid(z / T)``
for one logit, ``softmax(z / T)`` for N. It keeps the ranking (AUROC) and the argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_BINS = 15
# logit(p) of a probability is taken after clipping p to [EPS, 1 - EPS]: a float32 sigmoid
# rounds to exactly 1.0 above a logit of ~17, whose logit would be infinite.
EPS = 1e-7
# log T is searched within these bounds (T from 0.01 to 100): a T at either bound means the
# logits carry no usable signal (T -> inf) or are separable (T -> 0), not a calibration.
LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


@dataclass(frozen=True, kw_only=True)
class Reliability:
    """Equal-width reliability bins of probabilities against events.

    Attributes:
        edges: ``[M + 1]`` bin edges ``k / M``.
        count: ``[M]`` cases per bin.
        confidence: ``[M]`` mean probability in each bin (NaN when empty).
        frequency: ``[M]`` share of the bin's cases where the event happened (NaN when empty).
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    frequency: np.ndarray

    @property
    def ece(self) -> float:
        """The expected calibration error (see the module docstring); NaN without cases."""
        total = int(self.count.sum())
        if total == 0:
            return float("nan")
        full = self.count > 0
        gaps = np.abs(self.frequency[full] - self.confidence[full])
        return float((self.count[full] * gaps).sum() / total)

    def to_dict(self) -> dict[str, list]:
        """JSON-ready lists (NaN of an empty bin as None)."""

        def clean(values: np.ndarray) -> list:
            return [None if math.isnan(v) else float(v) for v in values]

        return {
            "edges": [float(e) for e in self.edges],
            "count": [int(c) for c in self.count],
            "confidence": clean(self.confidence),
            "frequency": clean(self.frequency),
        }


def bin_index(probs: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """0-based bin of each probability: ``(m-1)/M < p <= m/M`` is bin ``m - 1``, 0 in bin 0."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    edges = np.arange(n_bins + 1) / n_bins
    return np.searchsorted(edges[1:-1], np.asarray(probs, np.float64), side="left")


def reliability(probs: np.ndarray, events: np.ndarray, n_bins: int = DEFAULT_BINS) -> Reliability:
    """Bin ``probs [N]`` (in [0, 1]) against the boolean ``events [N]``.

    Raises:
        ValueError: shapes differ, or a probability lies outside [0, 1] or is NaN.
    """
    probs = np.asarray(probs, np.float64).reshape(-1)
    events = np.asarray(events, bool).reshape(-1)
    if probs.shape != events.shape:
        raise ValueError(f"{probs.size} probabilities but {events.size} outcomes")
    if probs.size and not ((probs >= 0) & (probs <= 1)).all():
        raise ValueError("probabilities must lie in [0, 1] (none NaN)")
    index = bin_index(probs, n_bins)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=probs, minlength=n_bins) / count
        frequency = np.bincount(index, weights=events.astype(np.float64), minlength=n_bins) / count
    return Reliability(
        edges=np.arange(n_bins + 1) / n_bins,
        count=count,
        confidence=confidence,
        frequency=frequency,
    )


def expected_calibration_error(
    probs: np.ndarray, events: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    """ECE of ``probs [N]`` against ``events [N]`` (see the module docstring)."""
    return reliability(probs, events, n_bins).ece


def top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(probability, event)`` of class probabilities ``[N, C]``: for two classes the
    probability of class 1 and ``label == 1``; else the top probability and whether the
    top class is the label."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).reshape(-1)
    if probs.ndim != 2:
        raise ValueError(f"class probabilities must be [N, C], got shape {probs.shape}")
    if probs.shape[1] == 2:
        return probs[:, 1], labels == 1
    return probs.max(axis=1), probs.argmax(axis=1) == labels


def logit(probs: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` of probabilities clipped to ``[EPS, 1 - EPS]``."""
    p = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def scaled_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``sigmoid(z / T)`` of logits ``[N]``, ``softmax(z / T)`` of logits ``[N, C]``."""
    z = np.asarray(logits, np.float64) / _checked(temperature)
    return sigmoid(z) if z.ndim == 1 else softmax(z)


def scale_probability(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of binary probabilities: ``sigmoid(logit(p) / T)``, elementwise.

    A monotone map of ``p``: thresholds, rankings and maxima commute with it.
    """
    return sigmoid(logit(probs) / _checked(temperature))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (natural log) of ``labels`` under the logits divided by
    ``temperature``: binary cross-entropy for logits ``[N]`` (labels 0/1), cross-entropy
    of the softmax for logits ``[N, C]`` (labels 0..C-1)."""
    z = np.asarray(logits, np.float64) / _checked(temperature)
    labels = np.asarray(labels).reshape(-1)
    if z.shape[0] != labels.shape[0]:
        raise ValueError(f"{z.shape[0]} logits but {labels.shape[0]} labels")
    if z.ndim == 1:
        y = labels.astype(np.float64)
        # -log sigmoid(z) = log(1 + e^-z); -log(1 - sigmoid(z)) = log(1 + e^z)
        return float(np.mean(y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)))
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels.astype(np.int64)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T > 0`` minimising :func:`nll` of ``labels`` under ``logits / T``.

    Searched as ``log T`` within :data:`LOG_T_BOUNDS` by Brent's bounded method (the NLL of a
    temperature is smooth and, in practice, unimodal in ``log T``).

    Raises:
        ValueError: no logits; the labels hold one class only; or every case is on the
            right side (the label's logit the largest): the NLL then falls towards 0 as
            ``T -> 0`` and has no minimum to find.
    """
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("no logits to fit a temperature on")
    if np.unique(labels).size < 2:
        raise ValueError("the labels hold a single class: a temperature cannot be fitted")
    z = np.asarray(logits, np.float64)
    if z.shape[0] != labels.size:
        raise ValueError(f"{z.shape[0]} logits but {labels.size} labels")
    if _all_right(z, labels):
        raise ValueError(
            f"all {labels.size} cases are classified right: the NLL falls without bound as "
            "T -> 0 and no temperature can be fitted (use more or harder validation images)"
        )
    result = minimize_scalar(
        lambda log_t: nll(z, labels, math.exp(log_t)),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


def _all_right(z: np.ndarray, labels: np.ndarray) -> bool:
    """Whether every label's logit is strictly on the winning side."""
    if z.ndim == 1:
        return bool(((z > 0) == (labels == 1)).all() and (z != 0).all())
    idx = labels.astype(np.int64)
    own = z[np.arange(len(idx)), idx]
    others = z.copy()
    others[np.arange(len(idx)), idx] = -np.inf
    return bool((own > others.max(axis=1)).all())


def _checked(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return t
