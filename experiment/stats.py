"""Table 1's intervals: a two-level bootstrap over test patients and training seeds.

An arm's figure is the SIIM metric (mean over test images of per-image Dice) averaged over
its seeds; a difference between two arms is the difference of those figures. Two things
vary from one experiment to the next, and both enter every interval:

* the test set is a sample of patients, and SIIM images cluster by patient (12,047 images
  of 6,171 patients), so the unit of resampling is the patient: a drawn patient brings all
  of its images (grouped by the manifest's ``patient_key``), and an arm's value in a
  resample is the mean over the resampled images;
* the seeds are a sample of trainings of each arm: each arm's runs are resampled with
  replacement, independently per arm (seed 0 of one arm shares nothing with seed 0 of
  another).

A difference keeps its pairing by image: both arms are scored on the same resampled
patients. The interval is the percentile interval of the resampled values.

What it measures: resampling both levels at once (Owen's "pigeonhole" bootstrap, for
crossed designs) gives the replicates a variance of ``var(seed means)/S + var(patient
means)/P + var(seed x patient residual)/(S*P)``, each a plug-in (divide-by-n) variance.
The seed-by-patient noise enters all three terms, so it is over-counted (wide side); the
seed term is a plug-in variance of only S values, whose expectation is ``(S-1)/S`` of
the seed variance (2/3 with 3 seeds), so a large seed effect is under-counted with few
seeds. More seeds shrink both errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pneumo.shards.errors import ConfigError

_CHUNK = 1000  # resamples drawn per block, so memory stays at _CHUNK x patients

RESAMPLED = "test patients (all images of a drawn patient together) and each arm's seeds"

Runs = Sequence[Mapping[str, float]]  # per seed: image id -> Dice


@dataclass(frozen=True, kw_only=True)
class Interval:
    """An arm's mean Dice, or a difference between two arms, with its bootstrap interval.

    Attributes:
        estimate: the observed value (mean over seeds of the mean over images).
        low, high: the percentile interval at ``level``.
        n_patients, n_images: the test patients and images resampled.
        seeds: the arm's runs; base_seeds: the base arm's (None for a mean).
        resamples: bootstrap resamples drawn.
    """

    estimate: float
    low: float
    high: float
    level: float
    n_patients: int
    n_images: int
    seeds: int
    base_seeds: int | None
    resamples: int


@dataclass(frozen=True)
class _Design:
    """The test images grouped by patient: ``(seeds, patients)`` Dice sums per arm."""

    sizes: np.ndarray  # images per patient
    totals: tuple[np.ndarray, ...]  # per arm: (seeds, patients) sums of Dice
    n_images: int


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_sd of nothing")
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def mean_interval(
    runs: Runs,
    patients: Mapping[str, str],
    *,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """An arm's mean Dice over its seeds, resampling test patients and its seeds.

    Args:
        runs: per seed, image id -> Dice; every run scored on the same images.
        patients: image id -> patient key (at least every scored image).
        resamples, seed, level: bootstrap resamples, the local RNG's seed, the coverage.
    """
    design = _design([runs], patients)
    estimate, reps = _replicates(design, resamples, seed)
    return _interval(design, estimate, reps, level, (len(runs), None))


def difference_interval(
    arm: Runs,
    base: Runs,
    patients: Mapping[str, str],
    *,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """``arm - base`` mean Dice: the same resampled patients for both arms (paired by
    image), each arm's seeds resampled on their own. Arguments as :func:`mean_interval`."""
    design = _design([arm, base], patients)
    estimate, reps = _replicates(design, resamples, seed)
    return _interval(design, estimate, reps, level, (len(arm), len(base)))


def replicates(
    runs: Sequence[Runs], patients: Mapping[str, str], *, resamples: int, seed: int
) -> tuple[float, np.ndarray]:
    """The observed value and its ``resamples`` bootstrap replicates: of the mean for one
    arm's runs (``[runs]``), of ``arm - base`` for two (``[arm, base]``)."""
    if len(runs) not in (1, 2):
        raise ConfigError(f"replicates of one arm or of a difference of two, not {len(runs)}")
    return _replicates(_design(runs, patients), resamples, seed)


def _design(arms: Sequence[Runs], patients: Mapping[str, str]) -> _Design:
    """Check the runs and sum each run's Dice per patient.

    Patients are ordered by their first image id, so the draws depend on which images
    belong together, not on the keys' spelling or on the order runs list their images.
    """
    if not arms or any(not runs for runs in arms):
        raise ConfigError("every arm needs at least one evaluated seed")
    ids = sorted(arms[0][0])
    if not ids:
        raise ConfigError("no images to bootstrap")
    for run in (r for runs in arms for r in runs):
        if set(run) != set(ids):
            missing, extra = len(set(ids) - set(run)), len(set(run) - set(ids))
            raise ConfigError(
                f"evaluations are not on the same images ({missing} missing, {extra} extra): "
                "every arm and seed must be scored on the same test split"
            )
    unknown = [i for i in ids if not patients.get(i)]
    if unknown:
        raise ConfigError(
            f"{len(unknown)} scored images have no patient_key (first: {unknown[0]}): "
            "the per-image results must be joined to the dataset's manifest"
        )
    index: dict[str, int] = {}
    of_image = np.array([index.setdefault(patients[i], len(index)) for i in ids])
    sizes = np.bincount(of_image, minlength=len(index)).astype(np.float64)
    totals = tuple(
        np.stack(
            [
                np.bincount(of_image, np.array([r[i] for i in ids], np.float64), len(index))
                for r in runs
            ]
        )
        for runs in arms
    )
    return _Design(sizes=sizes, totals=totals, n_images=len(ids))


def _counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``(rows, n)``: how often each of n units is drawn in rows of n draws with
    replacement."""
    draws = rng.integers(0, n, (rows, n)) + n * np.arange(rows)[:, None]
    return np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def _replicates(design: _Design, resamples: int, seed: int) -> tuple[float, np.ndarray]:
    """Observed value and replicates; blocks of ``_CHUNK`` resamples, each drawing the
    patients, then each arm's seeds, from ``default_rng(seed)``."""
    if resamples < 1:
        raise ConfigError(f"resamples {resamples}: at least one")
    signs = (1.0, -1.0)[: len(design.totals)]
    n_patients = design.sizes.size
    estimate = sum(
        s * float(t.sum(axis=1).mean()) / design.n_images
        for s, t in zip(signs, design.totals, strict=True)
    )
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - start)
        weights = _counts(rng, rows, n_patients)  # (rows, patients)
        images = weights @ design.sizes  # resampled images per resample
        value = np.zeros(rows)
        for sign, totals in zip(signs, design.totals, strict=True):
            per_seed = weights @ totals.T / images[:, None]  # (rows, seeds): mean Dice
            seed_weights = _counts(rng, rows, totals.shape[0]) / totals.shape[0]
            value += sign * (per_seed * seed_weights).sum(axis=1)
        blocks.append(value)
    return estimate, np.concatenate(blocks)


def _interval(
    design: _Design,
    estimate: float,
    reps: np.ndarray,
    level: float,
    seeds: tuple[int, int | None],
) -> Interval:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level {level}: a coverage between 0 and 1")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return Interval(
        estimate=estimate,
        low=float(low),
        high=float(high),
        level=level,
        n_patients=int(design.sizes.size),
        n_images=design.n_images,
        seeds=seeds[0],
        base_seeds=seeds[1],
        resamples=int(reps.size),
    )
