"""The SIIM Dice against its definition, pixel by pixel, on random masks (hypothesis).

Per image: ``2|A∩B| / (|A| + |B|)``, 1 when both are empty; the score is the mean over
images. Masks are drawn often empty (on either side, or both) and of random shapes; the
post-processing search is checked against applying each triplet and scoring by the same
definition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumo.metrics.siim import PostProcess, PostProcessSearch, dice_per_image, siim_summary

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)


def dice_by_definition(pred: np.ndarray, truth: np.ndarray) -> list[float]:
    """Per-image Dice, counting pixels one at a time."""
    out = []
    for p, t in zip(pred, truth, strict=True):
        a = {i for i, v in enumerate(p.reshape(-1).tolist()) if v}
        b = {i for i, v in enumerate(t.reshape(-1).tolist()) if v}
        out.append(1.0 if not a and not b else 2 * len(a & b) / (len(a) + len(b)))
    return out


@st.composite
def mask_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and truths ``[N, H, W]``; each image's masks random, empty or full."""
    n, h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 6))

    def one() -> np.ndarray:
        kind = draw(st.sampled_from(["random", "random", "empty", "full"]))
        if kind == "empty":
            return np.zeros((h, w), dtype=np.uint8)
        if kind == "full":
            return np.ones((h, w), dtype=np.uint8)
        bits = draw(st.lists(st.integers(0, 1), min_size=h * w, max_size=h * w))
        return np.array(bits, dtype=np.uint8).reshape(h, w)

    pred = np.stack([one() for _ in range(n)])
    truth = np.stack([one() for _ in range(n)])
    return pred, truth


@PROPERTY
@given(mask_pairs(), st.sampled_from(["uint8", "bool", "torch", "channel"]))
def test_dice_is_the_definition(pair: tuple[np.ndarray, np.ndarray], form: str) -> None:
    pred, truth = pair
    expected = dice_by_definition(pred, truth)
    if form == "bool":
        args = (pred.astype(bool), truth.astype(bool))
    elif form == "torch":
        args = (torch.from_numpy(pred), torch.from_numpy(truth))
    elif form == "channel":  # [N, 1, H, W]
        args = (pred[:, None], truth[:, None])
    else:
        args = (pred, truth)
    got = dice_per_image(*args)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    true_area = truth.reshape(len(truth), -1).sum(1)
    summary = siim_summary(got, true_area)
    assert summary["dice"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    positive = [d for d, a in zip(expected, true_area, strict=True) if a > 0]
    negative = [d for d, a in zip(expected, true_area, strict=True) if a == 0]
    if positive:
        assert summary["dice_pos"] == pytest.approx(sum(positive) / len(positive), abs=1e-12)
    if negative:  # a healthy image scores 1 exactly when predicted empty
        assert summary["dice_neg"] == pytest.approx(sum(negative) / len(negative), abs=1e-12)
    assert summary["empty_dice"] == pytest.approx(len(negative) / len(expected), abs=1e-12)
    assert summary["n_images"] == len(expected)
    assert summary["n_positive"] == len(positive)


@PROPERTY
@given(mask_pairs(), st.data())
def test_search_scores_are_the_dice_of_each_triplet(
    pair: tuple[np.ndarray, np.ndarray], data: st.DataObject
) -> None:
    """Every grid point's score is the mean Dice of that triplet's masks. Probabilities are
    on a coarse grid so thresholds fall on ties too."""
    _, truth = pair
    levels = data.draw(
        st.lists(
            st.sampled_from([0.0, 0.2, 0.3, 0.5, 0.55, 0.7, 0.9, 1.0]),
            min_size=truth.size,
            max_size=truth.size,
        )
    )
    probs = np.array(levels, dtype=np.float32).reshape(truth.shape)
    tops, masks = (0.5, 0.7), (0.2, 0.5)
    # min_area in 1024x1024 pixels: pick values that scale to 0, 1, 2 ... pixels of the map.
    unit = 1024 * 1024 / (truth.shape[1] * truth.shape[2])
    min_areas = tuple(sorted({round(k * unit) for k in (0, 1, 2, 5)}))
    finder = PostProcessSearch(tops, min_areas, masks)
    cut = data.draw(st.integers(0, len(truth)))  # fed in two batches
    for part in (slice(0, cut), slice(cut, None)):
        if len(truth[part]):
            finder.add(probs[part], truth[part])
    scores = finder.scores()
    for t, top in enumerate(tops):
        for a, area in enumerate(min_areas):
            for m, mask in enumerate(masks):
                pred = PostProcess(top, area, mask).apply(probs)
                # Independently: positive iff enough pixels strictly above ``top``, counted
                # against min_area scaled to the map (exact, in integers).
                h, w = truth.shape[1:]
                called = (probs > top).reshape(len(probs), -1).sum(1) * 1024**2 >= area * h * w
                expected_pred = (probs > mask) & called[:, None, None]
                np.testing.assert_array_equal(pred, expected_pred)
                expected = np.mean(dice_by_definition(expected_pred, truth))
                assert scores[t, a, m] == pytest.approx(expected, abs=1e-12)
