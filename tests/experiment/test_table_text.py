"""The experiment's tables, character by character, from rows whose every number was
worked out by hand (percent with one decimal, signs on differences, dashes for missing
values), and the rows from evaluation summaries with every option passed on."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo.experiment.stats import difference_interval
from pneumo.experiment.tables import (
    ArmRow,
    Comparison,
    PretrainRow,
    pretrain_markdown,
    table1_markdown,
    table1_rows,
    to_csv,
)

NONE = ArmRow(
    arm="none",
    title="No additional pretrain",
    report_dice=71.6,
    seeds=2,
    dice_mean=0.8,
    dice_sd=0.01,
    dice_pos_mean=0.25,
    dice_pos_sd=None,
    empty_dice=0.7421,
    n_images=120,
    n_positive=30,
    diff_to_none=None,
    ci_low=None,
    ci_high=None,
)
OTHER = ArmRow(
    arm="x",
    title="T",
    report_dice=None,
    seeds=2,
    dice_mean=0.812,
    dice_sd=None,
    dice_pos_mean=None,
    dice_pos_sd=None,
    empty_dice=0.5,
    n_images=120,
    n_positive=30,
    diff_to_none=0.012,
    ci_low=-0.0049,
    ci_high=0.03,
)

TABLE_1 = """\
| Model | Report | Dice (ours) [90% CI] | Dice on positives | Δ vs none [90% CI] | seeds | test images (positive) |
|---|---:|---:|---:|---:|---:|---:|
| No additional pretrain | 71.6 | 80.0 ± 1.0 | 25.0 | — | 2 | 120 (30) |
| T | — | 81.2 | — | +1.2 [-0.5, +3.0] | 2 | 120 (30) |

Dice: the SIIM metric (mean over test images of per-image Dice, an empty truth predicted empty scoring 1), in percent, mean ± sd over seeds.
Predicting no pneumothorax at all scores 74.2 on these images; Dice on positives is the informative part.
Δ: difference to the none arm, paired by image (the same test images).
Leakage effect (leaky − labels): +2.1 [+0.0, +4.0].
"""  # noqa: E501


def test_table_1_reads_exactly_as_written_by_hand():
    leakage = Comparison(arm="leaky", base="labels", mean=0.021, low=0.0, high=0.04)
    assert table1_markdown([NONE, OTHER], level=0.9, leakage=leakage) == TABLE_1


def test_table_1_defaults_to_a_95_percent_interval_and_no_leakage_line():
    text = table1_markdown([NONE])
    assert "| Δ vs none [95% CI] |" in text.splitlines()[0]
    assert "Leakage" not in text


def test_the_empty_prediction_line_follows_the_first_row_only():
    first_unknown = ArmRow(**{**NONE.__dict__, "empty_dice": None})
    assert "Predicting no pneumothorax" not in table1_markdown([first_unknown, OTHER])
    empty = table1_markdown([])
    assert empty.splitlines()[2:] == TABLE_1.replace("90%", "95%").splitlines()[4:6] + [
        TABLE_1.replace("90%", "95%").splitlines()[7]
    ]


LABELS = PretrainRow(
    arm="labels",
    labels="pneumothorax",
    auroc=0.8123,
    balanced_accuracy=0.7,
    accuracy=0.77,
    majority_rate=0.9,
    n_images=50,
)
PSEUDO = PretrainRow(
    arm="pseudo",
    labels="14 pseudo-classes",
    auroc=None,
    balanced_accuracy=None,
    accuracy=0.3191,
    majority_rate=0.2,
    n_images=None,
)
PRETRAIN = """\
| Classifier | Classes | AUROC | Balanced accuracy | Accuracy | Majority share | test images |
|---|---|---:|---:|---:|---:|---:|
| Pretrain with labels | pneumothorax | 0.812 | 70.0 | 77.0 | 90.0 | 50 |
| Pretrain with pseudo-labels | 14 pseudo-classes | — | — | 31.9 | 20.0 | — |

The report: 77% accuracy with labels, 31.91% on 14 pseudo-classes — neither readable without the majority share beside it.
"""  # noqa: E501
CLUSTERS = "\nClusters: 3 (?), sizes 10, 5, 3; noise share 12.5, largest-cluster share 50.0.\n"


def test_the_pretraining_table_reads_exactly_as_written_by_hand():
    assert pretrain_markdown([LABELS, PSEUDO], None) == PRETRAIN
    cluster = {"sizes": [3, 10, 5], "noise_share": 0.125, "majority_share": 0.5}
    assert pretrain_markdown([LABELS, PSEUDO], cluster) == PRETRAIN + CLUSTERS
    named = dict(cluster, method="dbscan")
    assert "Clusters: 3 (dbscan), sizes 10, 5, 3;" in pretrain_markdown([LABELS], named)


def test_csv_has_a_header_plain_newlines_and_empty_cells_for_missing_values():
    assert to_csv([PSEUDO]) == (
        "arm,labels,auroc,balanced_accuracy,accuracy,majority_rate,n_images\n"
        "pseudo,14 pseudo-classes,,,0.3191,0.2,\n"
    )
    assert to_csv([]) == ""


def _per_image(seed: int) -> dict[str, float]:
    values = np.random.default_rng(seed).uniform(0.0, 1.0, 40)
    return {f"img{i}": float(v) for i, v in enumerate(values)}


SUMMARIES = {
    ("none", 3): {"dice": 0.8, "n_images": 6, "n_positive": 2, "empty_dice": 0.5},
    ("labels", 3): {
        "dice": 0.85,
        "dice_pos": 0.4,
        "n_images": 6,
        "n_positive": 2,
        "empty_baseline_dice": 0.25,
        "empty_dice": 0.9,
    },
}
PER_IMAGE = {("none", 3): _per_image(0), ("labels", 3): _per_image(1)}
PATIENTS = {f"img{i}": f"p{i // 2}" for i in range(40)}


def _interval(**options) -> tuple[float, float, float]:
    d = difference_interval(
        [PER_IMAGE[("labels", 3)]], [PER_IMAGE[("none", 3)]], PATIENTS, **options
    )
    return d.estimate, d.low, d.high


def test_rows_of_one_seed_pass_every_option_to_the_interval():
    rows = table1_rows(
        SUMMARIES,
        PER_IMAGE,
        ["none", "labels"],
        [3],
        patients=PATIENTS,
        resamples=300,
        seed=5,
        level=0.8,
    )
    none, labels = rows
    assert (none.seeds, none.dice_mean, none.dice_sd, none.dice_pos_mean) == (1, 0.8, None, None)
    assert (labels.dice_pos_mean, labels.n_images, labels.n_positive) == (0.4, 6, 2)
    assert none.empty_dice == 0.5  # the older summaries' key
    assert labels.empty_dice == 0.25  # the current key wins
    assert none.diff_to_none is None and none.ci_low is None
    mean, low, high = _interval(resamples=300, seed=5, level=0.8)
    assert (labels.diff_to_none, labels.ci_low, labels.ci_high) == (mean, low, high)
    assert low < high  # a case where resamples, seed and level all matter
    assert (mean, low, high) != _interval(resamples=300, seed=6, level=0.8)


def test_rows_default_to_ten_thousand_resamples_seed_zero_and_95_percent():
    labels = table1_rows(SUMMARIES, PER_IMAGE, ["none", "labels"], [3], patients=PATIENTS)[1]
    assert (labels.diff_to_none, labels.ci_low, labels.ci_high) == _interval(
        resamples=10_000, seed=0, level=0.95
    )
    assert labels.report_dice == 76.4 and labels.title == "Pretrain with labels"


@pytest.mark.parametrize("n_seeds", [2, 3])
def test_rows_take_counts_from_the_first_seed(n_seeds):
    seeds = list(range(n_seeds))
    summaries = {
        (arm, s): {"dice": 0.5 + s / 10, "n_images": 6 + s, "n_positive": 2 + s}
        for arm in ("none",)
        for s in seeds
    }
    per_image = {("none", s): _per_image(s) for s in seeds}
    row = table1_rows(summaries, per_image, ["none"], seeds, patients=PATIENTS)[0]
    assert (row.n_images, row.n_positive, row.seeds) == (6, 2, n_seeds)
    assert row.dice_sd == pytest.approx(float(np.std([0.5 + s / 10 for s in seeds], ddof=1)))
