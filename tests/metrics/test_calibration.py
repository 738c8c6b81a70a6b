"""Calibration arithmetic: reliability bins and ECE by hand, NLL against torch, temperature
scaling on synthetic over-confident logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumo.metrics.calibration import (
    bin_index,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability,
    scale_probability,
    scaled_probabilities,
    top_label,
)

# Eight cases in 5 bins with edges 0, .2, .4, .6, .8, 1. Two probabilities sit exactly on
# the edge 0.2, and one on 1.0.
PROBS = np.array([0.1, 0.2, 0.2, 0.3, 0.9, 0.9, 0.9, 1.0])
EVENTS = np.array([0, 1, 0, 0, 1, 1, 0, 1], bool)


def test_ece_by_hand_with_right_closed_bins_weighted_by_count() -> None:
    # Bins are right-closed, (a, b], the first also holding 0:
    #   [0, .2]:  0.1, 0.2, 0.2 -> events 0, 1, 0: freq 1/3, conf 0.5/3 = 1/6, gap 1/6
    #   (.2, .4]: 0.3           -> event 0:        freq 0,   conf 0.3,         gap 0.3
    #   (.8, 1]:  .9, .9, .9, 1 -> events 1,1,0,1: freq 3/4, conf 3.7/4=.925, gap 0.175
    # ECE = (3 * 1/6 + 1 * 0.3 + 4 * 0.175) / 8 = (0.5 + 0.3 + 0.7) / 8 = 0.1875.
    # A left-closed [a, b) binning moves both 0.2s to the second bin: (0.1 + 3 * 0.1 + 0.7)
    # / 8 = 0.1375; the plain mean of the three gaps is (1/6 + 0.3 + 0.175) / 3 = 0.2139.
    assert expected_calibration_error(PROBS, EVENTS, n_bins=5) == pytest.approx(0.1875, abs=1e-12)
    bins = reliability(PROBS, EVENTS, n_bins=5)
    assert bins.count.tolist() == [3, 1, 0, 0, 4]
    assert bins.edges.tolist() == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert bins.confidence[[0, 1, 4]] == pytest.approx([0.5 / 3, 0.3, 0.925])
    assert bins.frequency[[0, 1, 4]] == pytest.approx([1 / 3, 0.0, 0.75])
    assert np.isnan(bins.confidence[2]) and np.isnan(bins.frequency[3])
    record = bins.to_dict()
    assert record["count"] == [3, 1, 0, 0, 4] and record["confidence"][2] is None


def test_the_default_is_15_bins_and_edges_are_exact_fractions() -> None:
    assert len(reliability(PROBS, EVENTS).count) == 15
    # np.linspace(0, 1, M + 1) rounds some edges below k / M (the 5th of 7, 21 of the 48
    # inner edges of 49): bins on those edges would put p = k / M one bin too high.
    for n_bins in (7, 10, 15, 49):
        edges = np.arange(1, n_bins + 1) / n_bins
        assert bin_index(edges, n_bins).tolist() == list(range(n_bins))
        above = np.nextafter(edges[:-1], 2.0)
        assert bin_index(above, n_bins).tolist() == list(range(1, n_bins))
    assert bin_index(np.array([0.0]), 15).tolist() == [0]


def test_bad_probabilities_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability(np.array([0.5, 1.2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="outcomes"):
        reliability(np.array([0.5, 0.2]), np.array([0, 1, 1]))
    assert math.isnan(expected_calibration_error(np.array([]), np.array([])))


def test_top_label_reads_two_classes_as_class_one() -> None:
    two = np.array([[0.9, 0.1], [0.3, 0.7]])
    p, event = top_label(two, np.array([1, 1]))
    assert p.tolist() == [0.1, 0.7] and event.tolist() == [True, True]
    three = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    p, event = top_label(three, np.array([1, 1]))
    assert p.tolist() == [0.5, 0.6] and event.tolist() == [True, False]


def test_nll_matches_torch() -> None:
    rng = np.random.default_rng(0)
    z, y = rng.normal(0, 3, 50), rng.integers(0, 2, 50)
    expected = F.binary_cross_entropy_with_logits(
        torch.tensor(z / 2.5), torch.tensor(y, dtype=torch.float64)
    )
    assert nll(z, y, 2.5) == pytest.approx(float(expected), rel=1e-12)
    z3, y3 = rng.normal(0, 3, (50, 3)), rng.integers(0, 3, 50)
    expected = F.cross_entropy(torch.tensor(z3 / 0.5), torch.tensor(y3))
    assert nll(z3, y3, 0.5) == pytest.approx(float(expected), rel=1e-12)
    assert scaled_probabilities(z3, 2.0) == pytest.approx(
        torch.softmax(torch.tensor(z3 / 2.0), dim=1).numpy()
    )


def _calibrated_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn with P(y = 1 | z) = sigmoid(z): calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return z, y


def test_temperature_undoes_logits_scaled_by_five() -> None:
    """A model that outputs 5z for calibrated logits z is over-confident. The NLL is a
    proper scoring rule: for each z its expectation over y ~ Bernoulli(sigmoid(z)),
    -E[y log q + (1 - y) log(1 - q)], is smallest at q = sigmoid(z) (Gibbs' inequality),
    and q = sigmoid(5z / T) equals sigmoid(z) for every z exactly when T = 5. So the
    expected NLL is minimised at T = 5, and the fit on 20,000 samples lands near it."""
    z, y = _calibrated_set(20_000, seed=1)
    over = 5.0 * z
    t = fit_temperature(over, y)
    assert t == pytest.approx(5.0, rel=0.05)
    # 1.0 (no scaling) or the wrong direction (1/5) are far away
    assert nll(over, y, t) < nll(over, y) - 0.1
    before = expected_calibration_error(scaled_probabilities(over), y.astype(bool))
    after = expected_calibration_error(scaled_probabilities(over, t), y.astype(bool))
    assert before > 0.08 and after < 0.02, (before, after)
    # the fit is the NLL's minimum: nearby temperatures do worse
    assert nll(over, y, t) < min(nll(over, y, t * 1.05), nll(over, y, t / 1.05))


def test_temperature_of_softmax_logits_scaled_by_five() -> None:
    """The same argument for three classes: labels drawn from softmax(z), logits 5z."""
    rng = np.random.default_rng(2)
    z = rng.normal(0.0, 1.5, (20_000, 3))
    p = scaled_probabilities(z)
    y = (rng.random(len(z))[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    assert fit_temperature(5.0 * z, y) == pytest.approx(5.0, rel=0.05)


def test_an_under_confident_model_gets_a_temperature_below_one() -> None:
    z, y = _calibrated_set(20_000, seed=3)
    assert fit_temperature(z / 2.0, y) == pytest.approx(0.5, rel=0.05)


def test_a_fit_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="single class"):
        fit_temperature(np.array([1.0, 2.0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="positive"):
        nll(np.array([1.0]), np.array([1]), 0.0)


def test_a_fit_refuses_cases_all_classified_right() -> None:
    """With every case on the right side the NLL falls towards 0 as T -> 0: no minimum."""
    with pytest.raises(ValueError, match="classified right"):
        fit_temperature(np.array([-2.0, -0.5, 0.1, 3.0]), np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="classified right"):
        fit_temperature(np.array([[2.0, 0.0, 1.0], [0.0, 0.5, 0.2]]), np.array([0, 1]))
    # one case on the wrong side gives a minimum inside the bounds
    t = fit_temperature(np.array([-2.0, 0.5, 0.1, 3.0]), np.array([0, 0, 1, 1]))
    assert 0.01 < t < 100


def test_scale_probability_is_sigmoid_of_logit_over_t() -> None:
    p = np.array([0.01, 0.3, 0.5, 0.9, 1.0])
    t = 2.0
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    expected = 1 / (1 + np.exp(-np.log(clipped / (1 - clipped)) / t))
    assert scale_probability(p, t) == pytest.approx(expected, rel=1e-12)
    assert scale_probability(p, 1.0) == pytest.approx(clipped, rel=1e-9)
    assert (np.diff(scale_probability(p, 3.0)) > 0).all()  # monotone: rankings kept
