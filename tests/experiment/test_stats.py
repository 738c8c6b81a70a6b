"""The paired per-image bootstrap and the summaries over seeds, on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo.experiment.stats import bootstrap_interval, mean_sd, paired_differences
from pneumo.shards.errors import ConfigError

# Two seeds x four images; the arm's runs list the images in another order than the base's.
BASE = [
    {"a": 0.9, "b": 0.0, "c": 1.0, "d": 0.5},
    {"a": 0.8, "b": 0.2, "c": 1.0, "d": 0.4},
]
ARM = [
    {"d": 0.7, "c": 1.0, "b": 0.6, "a": 0.9},
    {"c": 0.0, "a": 1.0, "d": 0.7, "b": 0.4},
]
# Per image, mean over the two seeds of arm - base, worked out by hand:
# a: (0.0 + 0.2) / 2 = 0.1; b: (0.6 + 0.2) / 2 = 0.4; c: (0.0 - 1.0) / 2 = -0.5;
# d: (0.2 + 0.3) / 2 = 0.25
PER_IMAGE = {"a": 0.1, "b": 0.4, "c": -0.5, "d": 0.25}


def test_differences_are_paired_by_seed_and_image_id() -> None:
    diffs = paired_differences(ARM, BASE)
    assert diffs.shape == (2, 4)
    # columns in sorted id order a, b, c, d
    np.testing.assert_allclose(diffs.mean(axis=0), [PER_IMAGE[k] for k in "abcd"], atol=1e-12)


def test_interval_on_a_fixed_resample_set() -> None:
    """41 resamples: numpy's (and the usual) percentile of 41 sorted values puts the 2.5th
    and 97.5th percentiles exactly on the 2nd and 40th values."""
    ids = "abcd"
    draws = np.random.default_rng(5).integers(0, 4, (41, 4)).tolist()  # any fixed set
    means = sorted(sum(PER_IMAGE[ids[i]] for i in draw) / 4 for draw in draws)
    assert means[0] < means[1] < means[2] and means[38] < means[39] < means[40]  # no ties
    mean, low, high = bootstrap_interval(
        paired_differences(ARM, BASE), indices=np.array(draws), level=0.95
    )
    assert mean == pytest.approx(sum(PER_IMAGE.values()) / 4)  # 0.0625
    assert low == pytest.approx(means[1]) and high == pytest.approx(means[39])
    assert low < mean < high


def test_interval_width_matches_the_normal_theory_on_many_images() -> None:
    rng = np.random.default_rng(7)
    n, sd = 400, 0.1
    diffs = rng.normal(0.05, sd, (1, n))
    mean, low, high = bootstrap_interval(diffs, resamples=4000, seed=3)
    se = diffs.std(ddof=1) / np.sqrt(n)
    assert mean == pytest.approx(diffs.mean())
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.1)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.2 * se)


def test_interval_is_seeded_and_degenerate_for_a_constant_difference() -> None:
    rng = np.random.default_rng(0)
    diffs = rng.normal(0, 1, (3, 50))
    first = bootstrap_interval(diffs, resamples=1500, seed=11)
    assert bootstrap_interval(diffs, resamples=1500, seed=11) == first
    assert bootstrap_interval(diffs, resamples=1500, seed=12) != first
    assert bootstrap_interval(np.full((2, 30), 0.25), resamples=500) == pytest.approx(
        (0.25, 0.25, 0.25)
    )


def test_runs_on_other_images_or_unpaired_seeds_are_refused() -> None:
    other = [dict(run) for run in ARM]
    other[1]["e"] = other[1].pop("d")
    with pytest.raises(ConfigError, match="not on the same images"):
        paired_differences(other, BASE)
    with pytest.raises(ConfigError, match="paired runs"):
        paired_differences(ARM[:1], BASE)


def test_mean_sd_is_the_sample_sd() -> None:
    assert mean_sd([0.7, 0.8, 0.9]) == pytest.approx((0.8, 0.1))
    assert mean_sd([0.7]) == (0.7, None)


# Equal to 1e-12: the blocks' means may differ from one draw's in the last bit.
def _by_definition(per_image: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """The documented bootstrap in one draw: ``resamples`` rows of n indices in 0..n-1 from
    default_rng(seed), each row's mean, their 2.5th and 97.5th percentiles."""
    idx = np.random.default_rng(seed).integers(0, per_image.size, (resamples, per_image.size))
    low, high = np.quantile(per_image[idx].mean(axis=1), [0.025, 0.975])
    return float(per_image.mean()), float(low), float(high)


@pytest.mark.parametrize("resamples", [2_500, 999])  # not a multiple of the 1,000-row blocks
def test_resamples_drawn_in_blocks_are_the_resamples_asked_for(resamples: int) -> None:
    diffs = np.random.default_rng(1).normal(0.02, 0.1, (2, 37))
    got = bootstrap_interval(diffs, resamples=resamples, seed=7)
    assert got == pytest.approx(_by_definition(diffs.mean(axis=0), resamples, 7), rel=1e-12)


def test_the_defaults_are_ten_thousand_resamples_seeded_zero() -> None:
    diffs = np.random.default_rng(2).normal(0.0, 0.2, (1, 25))
    assert bootstrap_interval(diffs) == pytest.approx(
        _by_definition(diffs[0], 10_000, 0), rel=1e-12
    )


def test_float32_inputs_are_summarised_in_float64() -> None:
    values32 = np.array([0.1, 0.7, 1 / 3, 0.9, 0.05] * 3, dtype=np.float32)
    exact = values32.astype(np.float64)
    mean, sd = mean_sd(values32)
    assert (mean, sd) == pytest.approx((exact.mean(), exact.std(ddof=1)), rel=1e-12)
    diffs32 = values32.reshape(3, 5)
    got = bootstrap_interval(diffs32, resamples=500, seed=3)
    want = _by_definition(diffs32.astype(np.float64).mean(axis=0), 500, 3)
    assert got == pytest.approx(want, rel=1e-12)  # float32 sums differ from ~1e-8 on


def test_one_seed_is_paired_too_and_errors_say_what_is_wrong() -> None:
    diffs = paired_differences([{"b": 1.0, "a": 0.25}], [{"a": 0.5, "b": 0.5}])
    assert diffs.tolist() == [[-0.25, 0.5]]
    with pytest.raises(ConfigError) as e:
        paired_differences([{"a": 1.0, "x": 1.0, "y": 0.0}], [{"a": 0.5, "b": 0.5}])
    assert str(e.value) == (
        "evaluations are not on the same images (1 missing, 2 extra): "
        "every arm and seed must be scored on the same test split"
    )
    with pytest.raises(ConfigError, match=r"^no images to bootstrap$"):
        bootstrap_interval(np.zeros((2, 0)))
    with pytest.raises(ValueError, match=r"^mean_sd of nothing$"):
        mean_sd([])
