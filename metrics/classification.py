"""Classification figures that mean something on imbalanced labels.

NIH ChestX-ray14 has pneumothorax on 4.7% of its images: a classifier that never says
"pneumothorax" is 95% accurate. So accuracy is always reported beside the
``majority_rate`` (the accuracy of always predicting the most frequent class of the same
images), with the balanced accuracy (the mean per-class recall) and the AUROC, which do not
reward the majority guess (both 0.5 for it).

For N classes the AUROC is the unweighted mean of the one-vs-rest AUROCs of the classes
present in the labels (scikit-learn's ``multi_class="ovr", average="macro"``, but defined
when some class is absent from a split).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive``; NaN without both
    classes. Ties count one half (the Mann-Whitney U statistic)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # 1-based ranks of the scores, tied scores sharing their mean rank
    _, group, size = np.unique(
        np.asarray(score, np.float64), return_inverse=True, return_counts=True
    )
    ranks = (np.cumsum(size) - (size - 1) / 2)[group.reshape(-1)]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def macro_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUROC of class 1 for two classes; else the mean one-vs-rest AUROC over the
    classes present in ``labels`` (NaN when fewer than two are)."""
    labels = np.asarray(labels)
    if probs.shape[1] == 2:
        return auroc(labels == 1, probs[:, 1])
    per_class = [auroc(labels == c, probs[:, c]) for c in np.unique(labels)]
    per_class = [a for a in per_class if a == a]
    return float(np.mean(per_class)) if per_class else float("nan")


def classification_summary(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """The figures of predicted class probabilities ``probs [N, C]`` against ``labels [N]``.

    Returns:
        ``accuracy`` (argmax), ``balanced_accuracy`` (mean recall over the classes present),
        ``auroc`` (see :func:`macro_auroc`), ``majority_rate`` (share of the most frequent
        class: the accuracy of always guessing it), ``n_images``, ``n_classes`` (C), and
        ``class_counts`` (images per class, C entries).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:  # a flat [N * C]; an empty [0, C] keeps its C
        probs = probs.reshape(len(labels), -1)
    n_classes = probs.shape[1]
    counts = np.bincount(labels, minlength=n_classes) if len(labels) else np.zeros(n_classes)
    if len(labels) == 0:
        nan = float("nan")
        return {
            "accuracy": nan,
            "balanced_accuracy": nan,
            "auroc": nan,
            "majority_rate": nan,
            "n_images": 0,
            "n_classes": n_classes,
            "class_counts": [0] * n_classes,
        }
    pred = probs.argmax(axis=1)
    recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    return {
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "auroc": macro_auroc(labels, probs),
        "majority_rate": float(counts.max() / len(labels)),
        "n_images": int(len(labels)),
        "n_classes": int(n_classes),
        "class_counts": [int(c) for c in counts],
    }
