"""``dice_table``: runs side by side, the all-empty baseline beside each, columns explained."""

from __future__ import annotations

from pneumo.evaluation.report import COLUMNS, dice_table, summary_text


def summary(**changes: object) -> dict:
    base = {
        "dice": 0.8804,
        "empty_baseline_dice": 0.679,
        "dice_pos": 0.6251,
        "sensitivity": 0.75,
        "specificity": 0.9,
        "n_images": 200,
        "n_positive": 64,
    }
    return {**base, **changes}


def test_rows_show_each_model_beside_its_empty_baseline() -> None:
    text = dice_table(
        [("U-Net, no pretraining", summary()), ("NIH-pretrained", summary(dice=0.8871))],
        legend=False,
    )
    head, rule, first, second = text.splitlines()
    assert head.split() == ["Model", "Dice", "Empty", "Dice+", "Sens", "Spec", "Images", "Pos"]
    assert set(rule) == {"-"} and len(rule) == len(head)
    assert first.split()[-7:] == ["88.0", "67.9", "62.5", "75.0", "90.0", "200", "64"]
    assert second.startswith("NIH-pretrained") and second.split()[1:3] == ["88.7", "67.9"]
    # Columns line up: every number ends where its heading ends.
    assert first.index("88.0") + 4 == head.index("Dice") + 4
    assert len({len(head), len(first), len(second)}) == 1


def test_missing_values_and_the_legend() -> None:
    text = dice_table([("no positives", summary(dice_pos=None, sensitivity=float("nan")))])
    row = text.splitlines()[2]
    assert row.split()[2:7] == ["88.0", "67.9", "-", "-", "90.0"]
    legend = text.split("\n\n", 1)[1].splitlines()
    for column in COLUMNS:  # every column: heading, JSON field, meaning
        line = next(x for x in legend if x.startswith(column.head + " "))
        assert f"{column.key}: {column.legend}" in line


def test_summary_text_says_what_was_scored() -> None:
    full = summary(
        split="test",
        where="split == 'test'",
        dataset="/data/siim",
        checkpoint="best",
        step=1500,
        size=512,
        resolution="full",
        tta=True,
        postprocess={"top_threshold": 0.75, "min_area": 2000, "mask_threshold": 0.4},
        auc=0.9123,
        accuracy=0.85,
        dice_neg=0.9,
    )
    text = summary_text("run-a", full)
    assert text.startswith(dice_table([("run-a", full)]))
    assert "step 1500" in text and "flip TTA on" in text and "full resolution" in text
    assert ">= 2000 px" in text and "p 0.75" in text and "p > 0.4" in text
    assert "auc 0.9123" in text
