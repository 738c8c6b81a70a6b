"""Table 1 from evaluation summaries and per-image results; the CLI's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumo.experiment.tables import REPORT_DICE, table1_markdown, table1_rows, to_csv

SEEDS = (0, 1)
IDS = ("i1", "i2", "i3", "i4")
PATIENTS = {i: f"patient-{i}" for i in IDS}


def _runs() -> tuple[dict, dict]:
    """none scores 0.5 everywhere; labels adds 0.2 on i1 and i2 in both seeds."""
    per_image = {}
    for seed in SEEDS:
        per_image[("none", seed)] = dict.fromkeys(IDS, 0.5)
        per_image[("labels", seed)] = {"i1": 0.7, "i2": 0.7, "i3": 0.5, "i4": 0.5}
    summaries = {
        key: {
            "dice": sum(v.values()) / 4,
            "dice_pos": 0.3 + 0.1 * key[1],
            "n_images": 4,
            "n_positive": 2,
            "empty_baseline_dice": 0.5,
        }
        for key, v in per_image.items()
    }
    return summaries, per_image


def test_rows_hold_means_sds_and_the_paired_difference() -> None:
    summaries, per_image = _runs()
    rows = table1_rows(
        summaries, per_image, ("none", "labels"), SEEDS, patients=PATIENTS, resamples=500
    )
    none, labels = rows
    assert none.dice_mean == pytest.approx(0.5) and none.dice_sd == pytest.approx(0.0)
    assert labels.dice_mean == pytest.approx(0.6)
    assert labels.dice_pos_mean == pytest.approx(0.35)
    assert labels.dice_pos_sd == pytest.approx(0.0707107, rel=1e-5)  # sd of 0.3, 0.4
    assert labels.diff_to_none == pytest.approx(0.1)
    # resampling 4 images whose differences are 0.2, 0.2, 0, 0: means lie in [0, 0.2]
    assert 0.0 <= labels.ci_low < 0.1 < labels.ci_high <= 0.2
    assert none.diff_to_none is None and none.report_dice == REPORT_DICE["none"] == 71.6
    assert (labels.report_dice, labels.empty_dice, labels.n_positive) == (76.4, 0.5, 2)


def test_markdown_and_csv_show_the_same_numbers() -> None:
    summaries, per_image = _runs()
    rows = table1_rows(
        summaries, per_image, ("none", "labels"), SEEDS, patients=PATIENTS, resamples=500
    )
    md = table1_markdown(rows)
    assert (
        "| No additional pretrain | 71.6 | 50.0 ± 0.0 [50.0, 50.0] | 35.0 ± 7.1 | — | 2 | 4 (2) |"
        in md
    )
    assert f"+10.0 [{100 * rows[1].ci_low:+.1f}, {100 * rows[1].ci_high:+.1f}]" in md
    assert "scores 50.0 on these images" in md
    lines = to_csv(rows).splitlines()
    assert lines[0].startswith("arm,title,report_dice,seeds,dice_mean,dice_sd,")
    none = dict(zip(lines[0].split(","), lines[1].split(","), strict=True))
    assert float(none["dice_mean"]) == 0.5 and none["diff_to_none"] == ""


@pytest.mark.integration
def test_cli_refuses_a_bad_recipe_and_unknown_arms(pneumo, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[segment]\nsize = 100\n")
    proc = pneumo(
        "experiment", str(tmp_path), "--out", str(tmp_path / "e"), "--recipe", str(bad), check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: {bad}: [segment] size: must be a multiple of 32 (U-Net strides), >= 32, got 100"
    )
    proc = pneumo(
        "experiment",
        str(tmp_path),
        "--out",
        str(tmp_path / "e"),
        "--arms",
        "none,best",
        check=False,
    )
    assert proc.returncode == 1 and "--arms: unknown best" in proc.stderr
