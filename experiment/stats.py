"""Summaries over seeds and the paired per-image bootstrap of a difference between arms.

Two arms are compared on the same test images: per seed, image by image (paired by image
id), the arm's Dice minus the baseline's. Those differences are averaged over seeds per
image; the images are the unit of resampling (the test set is a sample of patients'
images, the seeds a sample of trainings of each arm, averaged within the image). The
interval is the percentile interval of the resampled means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pneumo.shards.errors import ConfigError

_CHUNK = 1000  # resamples drawn per block, so memory stays at _CHUNK x images


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_sd of nothing")
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def paired_differences(
    arm: Sequence[Mapping[str, float]], base: Sequence[Mapping[str, float]]
) -> np.ndarray:
    """``(seeds, images)`` matrix of per-image Dice differences ``arm - base``.

    Args:
        arm, base: per seed (same order), image id -> Dice. Every run must have scored
            exactly the same images.

    Raises:
        ConfigError: different numbers of seeds, or runs scored on different images.
    """
    if len(arm) != len(base) or not arm:
        raise ConfigError(f"paired runs needed: {len(arm)} seeds against {len(base)}")
    ids = sorted(base[0])
    for run in (*arm, *base):
        if set(run) != set(ids):
            missing = len(set(ids) - set(run))
            extra = len(set(run) - set(ids))
            raise ConfigError(
                f"evaluations are not on the same images ({missing} missing, {extra} extra): "
                "every arm and seed must be scored on the same test split"
            )
    return np.array([[a[i] - b[i] for i in ids] for a, b in zip(arm, base, strict=True)])


def bootstrap_interval(
    differences: np.ndarray,
    *,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    indices: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Mean difference and its percentile bootstrap interval, resampling images.

    Args:
        differences: ``(seeds, images)`` from :func:`paired_differences`.
        resamples: bootstrap resamples (ignored when ``indices`` is given).
        seed: seeds the local RNG that draws the resamples.
        level: coverage of the interval (0.95: the 2.5th and 97.5th percentiles).
        indices: ``(resamples, images)`` image indices to use instead of drawing them.

    Returns:
        ``(mean, low, high)``: the observed mean difference and the interval.
    """
    per_image = np.asarray(differences, dtype=np.float64).mean(axis=0)
    n = per_image.size
    if n == 0:
        raise ConfigError("no images to bootstrap")
    if indices is None:
        rng = np.random.default_rng(seed)
        means = np.concatenate(
            [
                per_image[rng.integers(0, n, (min(_CHUNK, resamples - start), n))].mean(axis=1)
                for start in range(0, resamples, _CHUNK)
            ]
        )
    else:
        means = per_image[np.asarray(indices)].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(per_image.mean()), float(low), float(high)
