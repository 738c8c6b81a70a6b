"""Properties of the paired per-image bootstrap on random differences (hypothesis).

Derived from what a percentile bootstrap of a mean is, not from the code: the resampled
means of values that all lie in ``[lo, hi]`` lie there too; the observed mean is inside the
interval; an affine map of the differences maps the interval the same way (same seed, same
resamples), so a wider spread gives a proportionally wider interval; a higher level nests
the lower one; seeds are averaged per image before images are resampled.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumo.experiment.stats import bootstrap_interval

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)
RESAMPLES = 400

diffs = st.floats(-1, 1, allow_nan=False).map(lambda x: round(x, 3))  # Dice differences


@st.composite
def differences(draw: st.DrawFn) -> np.ndarray:
    """``(seeds, images)`` differences; images often share one value, one an outlier."""
    seeds, images = draw(st.integers(1, 3)), draw(st.integers(1, 30))
    values = draw(st.lists(diffs, min_size=seeds * images, max_size=seeds * images))
    out = np.array(values).reshape(seeds, images)
    if draw(st.booleans()):  # mostly ties: [0, 0, 0, 1]-like
        out[:] = 0.0
        out[:, draw(st.integers(0, images - 1))] = draw(diffs)
    return out


def interval(d: np.ndarray, seed: int, level: float = 0.95) -> tuple[float, float, float]:
    return bootstrap_interval(d, resamples=RESAMPLES, seed=seed, level=level)


@PROPERTY
@given(differences(), st.integers(0, 2**32 - 1))
def test_the_interval_holds_the_mean_and_lies_within_the_values(d: np.ndarray, seed: int) -> None:
    mean, low, high = interval(d, seed)
    per_image = d.mean(axis=0)
    assert mean == pytest.approx(float(per_image.sum() / per_image.size), abs=1e-12)
    eps = 1e-9
    assert per_image.min() - eps <= low <= mean + eps
    assert mean - eps <= high <= per_image.max() + eps


def test_the_last_image_is_resampled_too() -> None:
    """The issue's example: ``[0, 0, 0, 1]`` has mean 0.25 and an interval around it."""
    mean, low, high = bootstrap_interval(np.array([[0.0, 0.0, 0.0, 1.0]]), seed=0)
    assert mean == 0.25
    assert low == 0.0
    assert high == pytest.approx(0.75)  # the 1 drawn 3 times of 4: P = 4.7%, 4 times: 0.4%


@PROPERTY
@given(
    differences(),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1.5, 2.0, 4.0]),
    st.sampled_from([-0.5, 0.0, 0.25]),
)
def test_a_wider_spread_gives_a_proportionally_wider_interval(
    d: np.ndarray, seed: int, scale: float, shift: float
) -> None:
    """``scale * (d - mean) + mean + shift``: same resamples, interval scaled about the mean
    and shifted; its width is ``scale`` times the width."""
    mean, low, high = interval(d, seed)
    per_image_mean = d.mean()
    spread = scale * (d - per_image_mean) + per_image_mean + shift
    mean2, low2, high2 = interval(spread, seed)
    assert mean2 == pytest.approx(mean + shift, abs=1e-9)
    assert low2 == pytest.approx(scale * (low - mean) + mean + shift, abs=1e-9)
    assert high2 == pytest.approx(scale * (high - mean) + mean + shift, abs=1e-9)
    assert high2 - low2 == pytest.approx(scale * (high - low), abs=1e-9)
    assert high2 - low2 >= high - low - 1e-12


@PROPERTY
@given(differences(), st.integers(0, 2**32 - 1))
def test_a_higher_level_nests_the_lower_one(d: np.ndarray, seed: int) -> None:
    _, low90, high90 = interval(d, seed, 0.90)
    _, low99, high99 = interval(d, seed, 0.99)
    assert low99 <= low90 <= high90 <= high99


@PROPERTY
@given(differences(), st.integers(0, 2**32 - 1))
def test_seeds_are_averaged_per_image_before_resampling(d: np.ndarray, seed: int) -> None:
    assert interval(d, seed) == pytest.approx(interval(d.mean(axis=0, keepdims=True), seed))


@PROPERTY
@given(st.integers(2, 40), st.integers(0, 2**32 - 1))
def test_every_image_is_resampled_at_the_same_rate(n: int, seed: int) -> None:
    """An image alone at 1 among 0s: its share of the resampled means is 1/n. Summed over the
    images, a one-hot difference's mean interval holds 1/n for each one, the last too."""
    for image in (0, n - 1):
        d = np.zeros((1, n))
        d[0, image] = 1.0
        mean, low, high = interval(d, seed, 0.99)
        assert mean == pytest.approx(1 / n)
        assert low <= 1 / n <= high
        assert high > 0  # drawn in some resample: P(never, in 400) is below 1e-70


@PROPERTY
@given(
    st.lists(diffs, min_size=2, max_size=30, unique=True),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.8, 0.9, 0.95]),
)
def test_the_interval_cuts_alpha_of_the_resampled_means_from_each_side(
    values: list[float], seed: int, level: float
) -> None:
    """Percentile interval: with the resamples given, at most ``(1 - level) / 2`` of their
    means (one more for interpolation) fall below it, and at most that many above."""
    n, resamples = len(values), 200
    indices = np.random.default_rng(seed).integers(0, n, (resamples, n))
    means = np.array(values)[indices].mean(axis=1)
    _, low, high = bootstrap_interval(np.array([values]), indices=indices, level=level)
    tail = (1 - level) / 2 * resamples + 1
    assert (means < low - 1e-12).sum() <= tail
    assert (means > high + 1e-12).sum() <= tail
    assert ((means >= low - 1e-12) & (means <= high + 1e-12)).sum() >= level * resamples - 2
