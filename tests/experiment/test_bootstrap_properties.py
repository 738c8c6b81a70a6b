"""Properties of Table 1's two-level bootstrap on random data (hypothesis).

Derived from what the bootstrap is, not from the code: the draws depend on which images
belong together, not on how patients are named or runs list their images; an arm's
resampled means are weighted means of its Dice values, so they lie within their range and
the interval holds the observed mean; constant data gives a point; adding the same amount
to both arms' Dice of an image (any amount per image) leaves a paired difference as it
was; an affine map of the Dice maps a mean's interval the same way; a higher level nests
the lower one.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumo.experiment.stats import difference_interval, mean_interval

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)
RESAMPLES = 300
EPS = 1e-9

dice = st.floats(0, 1, allow_nan=False).map(lambda x: round(x, 3))


@st.composite
def experiments(draw: st.DrawFn) -> dict:
    """Two arms (1-3 seeds each) on 1-20 images of 1-8 patients; often mostly ties."""
    n = draw(st.integers(1, 20))
    ids = [f"1.2.{i}" for i in range(n)]
    groups = draw(st.lists(st.integers(0, 7), min_size=n, max_size=n))
    patients = {i: f"patient-{g}" for i, g in zip(ids, groups, strict=True)}

    def runs() -> list[dict[str, float]]:
        seeds = draw(st.integers(1, 3))
        values = draw(st.lists(dice, min_size=seeds * n, max_size=seeds * n))
        out = np.array(values).reshape(seeds, n)
        if draw(st.booleans()):  # mostly ties: one image stands out
            out[:] = 0.5
            out[:, draw(st.integers(0, n - 1))] = draw(dice)
        return [dict(zip(ids, row.tolist(), strict=True)) for row in out]

    return {"arm": runs(), "base": runs(), "patients": patients}


def _options(seed: int, level: float = 0.95) -> dict:
    return {"resamples": RESAMPLES, "seed": seed, "level": level}


@PROPERTY
@given(experiments(), st.integers(0, 2**32 - 1), st.randoms(use_true_random=False))
def test_patient_names_and_image_order_do_not_change_the_draws(e: dict, seed: int, r) -> None:
    names = sorted(set(e["patients"].values()))
    renamed = dict(zip(names, r.sample([f"h{k:x}" for k in range(100)], len(names)), strict=True))
    patients = {i: renamed[p] for i, p in e["patients"].items()}

    def shuffled(runs: list[dict[str, float]]) -> list[dict[str, float]]:
        out = []
        for run in runs:
            items = list(run.items())
            r.shuffle(items)
            out.append(dict(items))
        return out

    got = difference_interval(shuffled(e["arm"]), shuffled(e["base"]), patients, **_options(seed))
    assert got == difference_interval(e["arm"], e["base"], e["patients"], **_options(seed))


@PROPERTY
@given(experiments(), st.integers(0, 2**32 - 1))
def test_a_mean_interval_holds_the_mean_and_lies_within_the_values(e: dict, seed: int) -> None:
    m = mean_interval(e["arm"], e["patients"], **_options(seed))
    values = np.array([list(run.values()) for run in e["arm"]])
    assert m.estimate == pytest.approx(values.mean(axis=1).mean(), abs=1e-12)
    assert values.min() - EPS <= m.low <= m.estimate + EPS
    assert m.estimate - EPS <= m.high <= values.max() + EPS


@PROPERTY
@given(experiments(), st.integers(0, 2**32 - 1))
def test_a_difference_interval_holds_the_difference(e: dict, seed: int) -> None:
    d = difference_interval(e["arm"], e["base"], e["patients"], **_options(seed))
    arm = mean_interval(e["arm"], e["patients"], **_options(seed)).estimate
    base = mean_interval(e["base"], e["patients"], **_options(seed)).estimate
    assert d.estimate == pytest.approx(arm - base, abs=1e-12)
    assert d.low - EPS <= d.estimate <= d.high + EPS


@PROPERTY
@given(experiments(), dice, st.integers(0, 2**32 - 1))
def test_constant_dice_gives_a_point(e: dict, value: float, seed: int) -> None:
    flat = [{i: value for i in run} for run in e["arm"]]
    m = mean_interval(flat, e["patients"], **_options(seed))
    assert (m.estimate, m.low, m.high) == pytest.approx((value, value, value), abs=1e-12)
    d = difference_interval(
        flat, [{i: value for i in run} for run in e["base"]], e["patients"], **_options(seed)
    )
    assert (d.estimate, d.low, d.high) == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)


@PROPERTY
@given(experiments(), st.integers(0, 2**32 - 1), st.randoms(use_true_random=False))
def test_what_both_arms_share_on_an_image_cancels_in_a_difference(e: dict, seed: int, r) -> None:
    """Pairing by image: the same patients for both arms in every resample."""
    shift = {i: r.uniform(-0.5, 0.5) for i in e["patients"]}
    moved = [
        [{i: v + shift[i] for i, v in run.items()} for run in e[arm]] for arm in ("arm", "base")
    ]
    got = difference_interval(*moved, e["patients"], **_options(seed))
    want = difference_interval(e["arm"], e["base"], e["patients"], **_options(seed))
    assert (got.estimate, got.low, got.high) == pytest.approx(
        (want.estimate, want.low, want.high), abs=EPS
    )


@PROPERTY
@given(
    experiments(),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.5, 2.0, 4.0]),
    st.sampled_from([-0.5, 0.0, 0.25]),
)
def test_an_affine_map_of_the_dice_maps_a_mean_interval(
    e: dict, seed: int, scale: float, shift: float
) -> None:
    mapped = [{i: scale * v + shift for i, v in run.items()} for run in e["arm"]]
    m = mean_interval(e["arm"], e["patients"], **_options(seed))
    got = mean_interval(mapped, e["patients"], **_options(seed))
    want = (scale * m.estimate + shift, scale * m.low + shift, scale * m.high + shift)
    assert (got.estimate, got.low, got.high) == pytest.approx(want, abs=EPS)


@PROPERTY
@given(experiments(), st.integers(0, 2**32 - 1))
def test_a_higher_level_nests_the_lower_one(e: dict, seed: int) -> None:
    d90 = difference_interval(e["arm"], e["base"], e["patients"], **_options(seed, 0.90))
    d99 = difference_interval(e["arm"], e["base"], e["patients"], **_options(seed, 0.99))
    assert d99.low <= d90.low <= d90.high <= d99.high
