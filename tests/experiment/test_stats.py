"""Table 1's two-level bootstrap (test patients and each arm's seeds) on constructed data
whose bootstrap distribution is known by hand or by the plug-in variance formula."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from pneumo.experiment.stats import (
    difference_interval,
    mean_interval,
    mean_sd,
    replicates,
)
from pneumo.shards.errors import ConfigError

Z975 = NormalDist().inv_cdf(0.975)


def _runs(values: np.ndarray) -> list[dict[str, float]]:
    """``(seeds, images)`` -> per seed, image id -> Dice (ids img000, img001, ...)."""
    return [{f"img{i:03d}": float(v) for i, v in enumerate(row)} for row in values]


def _grouped(n_patients: int, per_patient: int) -> dict[str, str]:
    """Images img000.. in blocks of ``per_patient`` consecutive images per patient."""
    return {f"img{i:03d}": f"p{i // per_patient}" for i in range(n_patients * per_patient)}


def _alone(n_images: int) -> dict[str, str]:
    """Every image its own patient: the image-level bootstrap."""
    return {f"img{i:03d}": f"img{i:03d}" for i in range(n_images)}


def _frequencies(reps: np.ndarray, values: list[float]) -> list[float]:
    near = np.isclose(reps[:, None], np.array(values)[None, :], atol=1e-9)
    assert near.any(axis=1).all(), sorted(set(np.round(reps, 6)))  # no other value occurs
    return list(near.mean(axis=0))


def test_a_drawn_patient_brings_all_its_images_and_the_mean_is_over_images() -> None:
    """Patient A: one image, Dice 1; patient B: three images, Dice 0. Two patients drawn
    with replacement: AA (1/4) -> 1, AB (1/2) -> 1 of 4 images = 0.25, BB (1/4) -> 0. An
    image-level bootstrap would also give 0.5 and 0.75; a mean of patient means 0.5."""
    runs = [{"a1": 1.0, "b1": 0.0, "b2": 0.0, "b3": 0.0}]
    patients = {"a1": "A", "b1": "B", "b2": "B", "b3": "B"}
    estimate, reps = replicates([runs], patients, resamples=4000, seed=1)
    assert estimate == 0.25
    # binomial sd of a frequency from 4000 draws is at most 0.008: 0.03 is over 3.5 sd
    assert _frequencies(reps, [1.0, 0.25, 0.0]) == pytest.approx([0.25, 0.5, 0.25], abs=0.03)


def test_identical_images_of_a_patient_give_the_patient_standard_error() -> None:
    """150 patients of 4 identical images each: the mean over images is the mean over
    patients, whose bootstrap variance is the plug-in variance of the patient values over
    150 (exactly, in expectation over resamples). An image-level bootstrap sees 600
    independent images and gives half the sd. Tolerance: the sd of 4,000 near-normal
    replicates is estimated within 1/sqrt(2 * 3999) = 1.1% (one sd); 5% is over 4 sd."""
    rng = np.random.default_rng(3)
    values = rng.uniform(0.0, 1.0, 150)
    runs = _runs(np.repeat(values, 4)[None, :])
    patients = _grouped(150, 4)
    _, reps = replicates([runs], patients, resamples=4000, seed=2)
    se = values.std(ddof=0) / np.sqrt(150)
    assert reps.std(ddof=1) == pytest.approx(se, rel=0.05)
    _, by_image = replicates([runs], _alone(600), resamples=4000, seed=2)
    assert by_image.std(ddof=1) == pytest.approx(se / 2, rel=0.05)

    grouped = mean_interval(runs, patients, resamples=4000, seed=2)
    alone = mean_interval(runs, _alone(600), resamples=4000, seed=2)
    assert grouped.estimate == pytest.approx(values.mean(), abs=1e-12)
    # percentile interval of a near-normal mean: 2 * 1.96 se (quantiles of 4,000: ~5%)
    assert grouped.high - grouped.low == pytest.approx(2 * Z975 * se, rel=0.1)
    assert grouped.high - grouped.low > 1.7 * (alone.high - alone.low)
    assert (grouped.n_patients, grouped.n_images, alone.n_patients) == (150, 600, 600)


def _seeded(offsets: tuple[float, float], noise: float = 0.0) -> tuple[list, list, dict]:
    """Base: one seed, Dice varying widely between 60 patients of 2 images. Arm: two seeds,
    base + a per-patient effect (the same in both seeds) + the seed's offset."""
    rng = np.random.default_rng(11)
    base = np.repeat(rng.uniform(0.2, 0.8, 60), 2)[None, :]
    effect = np.repeat(rng.normal(0.0, noise, 60), 2) if noise else np.zeros(120)
    arm = np.stack([base[0] + effect + o for o in offsets])
    return _runs(arm), _runs(base), _grouped(60, 2)


def test_two_seeds_that_disagree_widen_the_interval_by_the_seed_term() -> None:
    """Seed A +10 points, seed B -10 on every image: the seeds drawn are AA (1/4) -> +10,
    AB or BA (1/2) -> 0, BB (1/4) -> -10, whichever patients are drawn (the base's Dice
    cancels image by image). The 95% interval is [-10, +10]; seeds that agree give a point."""
    arm, base, patients = _seeded((0.1, -0.1))
    _, reps = replicates([arm, base], patients, resamples=4000, seed=5)
    assert _frequencies(reps, [0.1, 0.0, -0.1]) == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    d = difference_interval(arm, base, patients, resamples=4000, seed=5)
    assert (d.estimate, d.low, d.high) == pytest.approx((0.0, -0.1, 0.1), abs=1e-12)
    agree = difference_interval(*_seeded((0.0, 0.0)), resamples=4000, seed=5)
    assert (agree.estimate, agree.low, agree.high) == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert (d.seeds, d.base_seeds, d.n_patients, d.n_images) == (2, 1, 60, 120)


def test_the_seed_term_adds_the_plug_in_variance_of_the_seed_means_over_seeds() -> None:
    """With a per-patient effect (sd 3 points) as well: the replicates' variance grows by
    var({+0.1, -0.1}) / 2 seeds = 0.01 / 2 = 0.005 when the seeds disagree (the effect is
    the same in both seeds: no interaction term). The same bootstrap seed draws the same
    patients for both, so the difference is the seed part's variance (plus a covariance
    near 0), whose estimate from 8,000 draws of a {-0.1, 0, 0.1} variable at 1/4, 1/2, 1/4
    has an sd of sqrt((mu4 - var^2) / 8000) = 1.1% of 0.005: 10% is about 9 sd."""
    agree = replicates(
        [*_seeded((0.0, 0.0), noise=0.03)[:2]], _grouped(60, 2), resamples=8000, seed=9
    )[1]
    disagree = replicates(
        [*_seeded((0.1, -0.1), noise=0.03)[:2]], _grouped(60, 2), resamples=8000, seed=9
    )[1]
    assert disagree.var() - agree.var() == pytest.approx(0.005, rel=0.1)
    assert agree.var() > 0  # the patients' part is there in both


def test_each_arm_draws_its_own_seeds() -> None:
    """Arm and base both with seeds at +10 and -10 points on the same Dice: drawn together
    (seed i of one arm with seed i of the other) the difference would always be 0. Drawn
    independently it is 0.05 * (a - b) * 2 with a, b in {1, 0, -1} at 1/4, 1/2, 1/4: -20
    and +20 points each have probability 1/16 = 6.25%, so the 95% interval is [-20, +20]."""
    rng = np.random.default_rng(4)
    dice = rng.uniform(0.2, 0.8, 40)
    runs = _runs(np.stack([dice + 0.1, dice - 0.1]))
    d = difference_interval(runs, runs, _alone(40), resamples=4000, seed=0)
    assert (d.estimate, d.low, d.high) == pytest.approx((0.0, -0.2, 0.2), abs=1e-12)
    _, reps = replicates([runs, runs], _alone(40), resamples=4000, seed=0)
    assert reps.var() == pytest.approx(0.005 + 0.005, rel=0.1)


def test_a_difference_is_paired_by_image() -> None:
    """Dice varies from 0.1 to 0.9 between patients, the arm is +5 points on every image:
    the same resampled patients for both arms give exactly +5; each mean alone is wide."""
    rng = np.random.default_rng(8)
    base = np.repeat(rng.uniform(0.1, 0.9, 50), 3)
    arm_runs, base_runs = _runs((base + 0.05)[None, :]), _runs(base[None, :])
    patients = _grouped(50, 3)
    d = difference_interval(arm_runs, base_runs, patients, resamples=2000, seed=3)
    assert (d.estimate, d.low, d.high) == pytest.approx((0.05, 0.05, 0.05), abs=1e-12)
    alone = mean_interval(base_runs, patients, resamples=2000, seed=3)
    assert alone.high - alone.low > 0.1


def test_estimate_counts_and_options_by_hand() -> None:
    """Arm: two seeds, means 0.5 and 0.7; base: one seed, mean 0.4 (images listed in
    another order). Estimate 0.6 - 0.4 = 0.2."""
    arm = [{"x": 0.2, "y": 0.8, "z": 0.5}, {"z": 0.9, "x": 0.6, "y": 0.6}]
    base = [{"y": 0.1, "z": 0.6, "x": 0.5}]
    patients = {"x": "P", "y": "P", "z": "Q"}
    d = difference_interval(arm, base, patients, resamples=2500, seed=4, level=0.8)
    assert d.estimate == pytest.approx(0.2, abs=1e-12)
    assert (d.n_patients, d.n_images, d.seeds, d.base_seeds) == (2, 3, 2, 1)
    assert (d.resamples, d.level) == (2500, 0.8)  # not a multiple of the 1,000-row blocks
    m = mean_interval(arm, patients, resamples=300, seed=4)
    assert (m.estimate, m.base_seeds, m.resamples) == (pytest.approx(0.6), None, 300)
    again = difference_interval(arm, base, patients, resamples=2500, seed=4, level=0.8)
    assert again == d
    # the first 1,000 resamples of 2,500 are the 1,000 of a shorter run: blocks are seeded
    head = replicates([arm, base], patients, resamples=1000, seed=4)[1]
    assert not np.array_equal(replicates([arm, base], patients, resamples=1000, seed=5)[1], head)
    np.testing.assert_array_equal(
        replicates([arm, base], patients, resamples=2500, seed=4)[1][:1000], head
    )


def test_bad_input_is_refused_with_one_clear_line() -> None:
    arm = [{"a": 1.0, "b": 0.5}]
    patients = {"a": "P", "b": "Q"}
    with pytest.raises(ConfigError) as e:
        difference_interval(arm, [{"a": 1.0, "x": 1.0, "y": 0.0}], patients)
    assert str(e.value) == (
        "evaluations are not on the same images (1 missing, 2 extra): "
        "every arm and seed must be scored on the same test split"
    )
    with pytest.raises(ConfigError, match=r"^1 scored images have no patient_key \(first: b\)"):
        mean_interval(arm, {"a": "P"})
    with pytest.raises(ConfigError, match="at least one evaluated seed"):
        difference_interval(arm, [], patients)
    with pytest.raises(ConfigError, match=r"^no images to bootstrap$"):
        mean_interval([{}], {})
    with pytest.raises(ConfigError, match=r"^resamples 0: at least one$"):
        mean_interval(arm, patients, resamples=0)
    with pytest.raises(ConfigError, match=r"^level 1.0: a coverage between 0 and 1$"):
        mean_interval(arm, patients, level=1.0)
    with pytest.raises(ConfigError, match="one arm or of a difference of two"):
        replicates([arm, arm, arm], patients, resamples=10, seed=0)


def test_mean_sd_is_the_sample_sd() -> None:
    assert mean_sd([0.7, 0.8, 0.9]) == pytest.approx((0.8, 0.1))
    assert mean_sd([0.7]) == (0.7, None)
    with pytest.raises(ValueError, match=r"^mean_sd of nothing$"):
        mean_sd([])
