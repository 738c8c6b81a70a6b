"""Classification figures on hand-made cases where the plausible wrong formulas differ."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pneumo.metrics.classification import auroc, classification_summary, macro_auroc


def test_auroc_counts_pairs_and_ties_as_one_half() -> None:
    # Positives scored 0.9 and 0.4, negatives 0.4, 0.2, 0.1: of the 6 (pos, neg) pairs,
    # 5 are ordered right and one (0.4 vs 0.4) is a tie worth 1/2.
    positive = np.array([True, True, False, False, False])
    score = np.array([0.9, 0.4, 0.4, 0.2, 0.1])
    assert auroc(positive, score) == pytest.approx(5.5 / 6)
    assert auroc(~positive, score) == pytest.approx(0.5 / 6)  # the same ranking, reversed
    assert math.isnan(auroc(np.array([True, True]), np.array([0.1, 0.2])))


def test_an_all_negative_guess_has_the_majority_rate_as_accuracy_and_nothing_else() -> None:
    # 1 positive in 10: always predicting "negative" is 90% accurate, and no better than chance.
    labels = np.array([0] * 9 + [1])
    probs = np.tile([0.8, 0.2], (10, 1))
    s = classification_summary(labels, probs)
    assert s["accuracy"] == pytest.approx(0.9) and s["majority_rate"] == pytest.approx(0.9)
    assert s["balanced_accuracy"] == pytest.approx(0.5)  # recall 1 on negatives, 0 on positives
    assert s["auroc"] == pytest.approx(0.5)
    assert s["n_images"] == 10 and s["class_counts"] == [9, 1] and s["n_classes"] == 2


def test_three_classes_macro_one_vs_rest_and_balanced_accuracy() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # 0 -> 0
            [0.6, 0.3, 0.1],  # 0 -> 0
            [0.5, 0.1, 0.4],  # 0 -> 0
            [0.2, 0.7, 0.1],  # 0 -> 1 (wrong)
            [0.1, 0.8, 0.1],  # 1 -> 1
            [0.3, 0.3, 0.4],  # 1 -> 2 (wrong)
            [0.1, 0.2, 0.7],  # 2 -> 2
            [0.2, 0.2, 0.6],  # 2 -> 2
        ]
    )
    s = classification_summary(labels, probs)
    assert s["accuracy"] == pytest.approx(6 / 8)
    # recalls 3/4, 1/2, 2/2 (a support-weighted mean would be the accuracy, 0.75)
    assert s["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    # One-vs-rest AUROCs worked by hand from the columns:
    # class 0 (pos 0.7 0.6 0.5 0.2 vs neg 0.1 0.3 0.1 0.2): (4 + 4 + 4 + 2.5)/16
    # class 1 (pos 0.8 0.3 vs neg 0.2 0.3 0.1 0.7 0.2 0.2): (6 + 4.5)/12
    # class 2 (pos 0.7 0.6 vs neg 0.1 0.1 0.4 0.1 0.1 0.4): 12/12
    expected = (14.5 / 16 + 10.5 / 12 + 1.0) / 3
    assert s["auroc"] == pytest.approx(expected)
    assert macro_auroc(labels, probs) == pytest.approx(expected)
    assert s["majority_rate"] == pytest.approx(0.5)


def test_balanced_accuracy_is_the_unweighted_mean_of_recalls() -> None:
    labels = np.array([0] * 8 + [1] * 2)
    pred_one_hot = np.eye(2)[[0] * 8 + [1, 0]]  # negatives all right, positives half right
    s = classification_summary(labels, pred_one_hot)
    assert s["accuracy"] == pytest.approx(0.9)
    assert s["balanced_accuracy"] == pytest.approx((1 + 0.5) / 2)


def test_no_images_give_nan_figures_for_every_class_given():
    """A validation with no images (every rank's share empty) still knows its classes."""
    out = classification_summary(np.zeros(0, int), np.zeros((0, 3)))
    assert (out["n_images"], out["n_classes"], out["class_counts"]) == (0, 3, [0, 0, 0])
    assert all(math.isnan(out[k]) for k in ("accuracy", "balanced_accuracy", "auroc"))
