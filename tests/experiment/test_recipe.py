"""Recipes: the shipped ones load; every bad setting is named, with its file and table."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumo.experiment.recipe import (
    ClassifySettings,
    RecipeError,
    SegmentSettings,
    load_recipe,
    parse_recipe,
)


def test_shipped_recipes_load_with_the_reports_settings() -> None:
    report = load_recipe("report")
    seg, cls = report.segment, report.classify
    assert (seg.size, seg.batch_size, seg.lr) == (512, 8, 1e-4)  # the report's segmentation
    assert (cls.optimizer, cls.lr, cls.momentum) == ("sgd", 1e-3, 0.9)
    assert (cls.plateau_patience, cls.plateau_factor) == (5, 0.1)
    assert report.autoencode.kinds == ("ae", "vae") and report.cluster.clusters == 14
    assert report.pseudo_classify.balance == "classes"
    demo = load_recipe("demo")
    assert demo.segment.size < 128 and demo.experiment.seeds in (1, 2)
    assert "[segment]" in demo.text  # kept verbatim for the report


def test_a_file_recipe_takes_defaults_for_what_it_omits(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[segment]\nlr = 3e-4\npos_rate = "none"\n[experiment]\narms = ["none"]\n')
    recipe = load_recipe(path)
    assert recipe.segment.lr == 3e-4 and recipe.segment.pos_rate is None
    assert recipe.segment.size == SegmentSettings().size
    assert recipe.experiment.arms == ("none",)
    # [pseudo_classify] omitted: the classifier defaults, balanced over clusters
    assert recipe.pseudo_classify.balance == "classes"
    assert recipe.source == str(path)


def test_every_bad_setting_is_one_line_naming_file_table_and_setting(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[experiment]\nseeds = 0\narms = ['none', 'bogus']\n"
        "[segment]\nsize = 100\nlr = 'fast'\npos_rate = [0.8]\nbatch = 3\nlr_warm = 1\n"
        "[classify]\nbalance = 'pos-rate:2'\nepochs = 2.5\n"
        "[cluster]\nmethod = 'spectral'\n"
        "[extra]\nx = 1\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{path}: [") for line in lines)
    expected = {
        "[experiment] seeds",
        "[experiment] arms",
        "[segment] size",
        "[segment] lr",
        "[segment] pos_rate",
        "[segment] batch",
        "[segment] lr_warm",
        "[classify] balance",
        "[classify] epochs",
        "[cluster] method",
        "[extra]",
    }
    named = {line.split(": ", 2)[1] for line in lines}
    assert named == expected  # one line each, nothing else
    assert any("[segment] batch: unknown setting" in line for line in lines)
    assert any("[segment] size: must be a multiple of 32" in line for line in lines)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[segment\nsize = 64\n", "not valid TOML"),
        ("segment = 3\n", r"must be a \[segment\] table"),
        ("[segment]\namp = 1\n", "amp: must be true or false"),
        ("[segment]\nepochs = true\n", "epochs: must be an integer"),
        ("[autoencode]\nkinds = ['ae', 'gan']\n", "kinds:"),
        ("[embed]\nsource = 'pca'\n", "source: must be one of"),
        ("[experiment]\nconfidence = 1.5\n", "confidence: must be between 0 and 1"),
    ],
)
def test_malformed_values_are_refused(text: str, needle: str) -> None:
    with pytest.raises(RecipeError, match=needle):
        parse_recipe(text, "r.toml")


def test_missing_file_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read it.*demo, report"):
        load_recipe(tmp_path / "nope.toml")


def test_settings_built_in_python_are_checked_too() -> None:
    with pytest.raises(RecipeError, match=r"\[classify\] lr: must be > 0"):
        ClassifySettings(lr=0.0)
    with pytest.raises(RecipeError, match=r"\[segment\] workers: must be an integer"):
        SegmentSettings(workers="2")  # type: ignore[arg-type]
