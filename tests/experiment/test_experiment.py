"""The experiment end to end on the tiny demo dataset: tables equal the evaluations, a
kill resumes without redoing finished stages, a changed setting reruns only what depends
on it."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pneumo.experiment.recipe import load_recipe
from pneumo.experiment.run import ExperimentConfig, make_plan, run_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARMS = ("none", "labels", "pseudo", "leaky")


def config(dataset: str, out: Path, recipe_file: Path, **kw: Any) -> ExperimentConfig:
    return ExperimentConfig(
        dataset=dataset, out=str(out), recipe=load_recipe(recipe_file), **{"arms": ARMS, **kw}
    )


@pytest.fixture(scope="module")
def finished(demo_dataset, tiny_recipe_file, tmp_path_factory) -> tuple[ExperimentConfig, dict]:
    dataset, _ = demo_dataset
    cfg = config(dataset, tmp_path_factory.mktemp("exp"), tiny_recipe_file, command="pytest")
    return cfg, run_experiment(cfg)


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["arm"]: row for row in csv.DictReader(f)}


def test_table_numbers_are_the_evaluations(finished) -> None:
    cfg, result = finished
    exp = Path(cfg.out)
    plan = make_plan(cfg)
    rows = _csv_rows(exp / "table1.csv")
    assert set(rows) == set(plan.arms)
    for arm in plan.arms:
        # what evaluate wrote into each run, independently of the experiment's records
        runs = [
            json.loads((exp / plan.segments[(arm, s)].path / "eval" / "test.json").read_text())
            for s in plan.seeds
        ]
        dice = [r["dice"] for r in runs]
        assert float(rows[arm]["dice_mean"]) == pytest.approx(sum(dice) / len(dice), abs=1e-12)
        mean = sum(dice) / len(dice)
        sd = (sum((d - mean) ** 2 for d in dice) / (len(dice) - 1)) ** 0.5
        assert float(rows[arm]["dice_sd"]) == pytest.approx(sd, abs=1e-12)
        pos = [r["dice_pos"] for r in runs]
        assert float(rows[arm]["dice_pos_mean"]) == pytest.approx(sum(pos) / len(pos))
        assert int(rows[arm]["n_images"]) == runs[0]["n_images"] > 0
        assert int(rows[arm]["seeds"]) == len(plan.seeds) == 2
    assert rows["none"]["diff_to_none"] == "" and rows["none"]["report_dice"] == "71.6"
    for arm in plan.arms[1:]:  # on the same images, the mean paired difference is the
        # difference of the mean Dice: a check independent of the bootstrap's pairing
        diff = float(rows[arm]["dice_mean"]) - float(rows["none"]["dice_mean"])
        assert float(rows[arm]["diff_to_none"]) == pytest.approx(diff, abs=1e-9)
        assert float(rows[arm]["ci_low"]) <= float(rows[arm]["diff_to_none"])
        assert float(rows[arm]["diff_to_none"]) <= float(rows[arm]["ci_high"])
    table = (exp / "table1.md").read_text()
    assert table == result["table1"]
    none = rows["none"]
    shown = f"{100 * float(none['dice_mean']):.1f} ± {100 * float(none['dice_sd']):.1f}"
    assert shown in table and "| No additional pretrain | 71.6 |" in table
    assert "Leakage effect (leaky − labels)" in table


def test_pretraining_numbers_are_the_classifier_evaluations(finished) -> None:
    cfg, _ = finished
    exp = Path(cfg.out)
    plan = make_plan(cfg)
    rows = _csv_rows(exp / "pretraining.csv")
    assert set(rows) == {"labels", "pseudo", "leaky"}
    for arm, row in rows.items():
        run = exp / plan.encoders[arm].path
        summary = json.loads((run / "eval" / "test.json").read_text())
        for name in ("auroc", "balanced_accuracy", "accuracy", "majority_rate"):
            assert float(row[name]) == pytest.approx(summary[name], abs=1e-12)
        labels = json.loads((run / "config.json").read_text())["labels"]
        assert (labels == "has_ptx") == (arm != "pseudo")
    clusters = json.loads((exp / plan.cluster.path / "labels" / "_clusters.json").read_text())
    assert (
        f"sizes {', '.join(map(str, sorted(clusters['sizes'], reverse=True)))}"
        in (exp / "pretraining.md").read_text()
    )


def test_each_arm_starts_from_its_own_pretraining_and_nothing_else_differs(finished) -> None:
    cfg, _ = finished
    exp = Path(cfg.out)
    plan = make_plan(cfg)
    configs = {}
    for arm in plan.arms:
        config_json = json.loads((exp / plan.segments[(arm, 0)].path / "config.json").read_text())
        chain = config_json["init"]  # where the weights came from, as the checkpoint says
        if arm == "none":
            assert chain == [{"seed": 0, "source": "random"}]
        else:
            classifier = exp / plan.encoders[arm].path / "checkpoints" / "best.pt"
            assert chain[0]["source"] == str(classifier) and chain[0]["task"] == "classify"
        configs[arm] = {
            k: v for k, v in config_json.items() if k not in ("out", "encoder_init", "init")
        }
    assert all(c == configs["none"] for c in configs.values())


def test_outputs_and_report(finished) -> None:
    cfg, result = finished
    exp = Path(cfg.out)
    for figure in ("figure1_reconstructions", "figure2_dice_curves", "figure3_pretraining"):
        assert (exp / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (exp / "report.md").read_text()
    assert "[segment]" in report and cfg.recipe.text.strip() in report  # the recipe, verbatim
    assert "pytest" in report and "torch:" in report and "## Stages" in report
    assert "segment none seed 1" in report
    assert result["report"] == str(exp / "report.md")


def test_a_changed_segmentation_setting_reruns_only_segmentation_and_evaluation(
    finished,
) -> None:
    cfg, _ = finished
    recipe = cfg.recipe
    events: list[dict[str, Any]] = []
    changed = replace(
        cfg, seeds=1, recipe=replace(recipe, segment=replace(recipe.segment, lr=5e-4))
    )
    run_experiment(changed, progress=events.append)
    status = {e["label"]: e["status"] for e in events if e.get("status") in ("run", "skip")}
    ran = {label for label, s in status.items() if s == "run"}
    assert ran == {f"{kind} {arm} seed 0" for kind in ("segment", "evaluate") for arm in ARMS}
    skipped = {label.split()[0] for label, s in status.items() if s == "skip"}
    assert skipped == {"audit", "autoencode", "classify", "evaluate", "embed", "cluster"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the experiment ended ({proc.returncode}) before {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def test_killed_mid_stage_then_rerun_redoes_no_finished_stage(
    demo_dataset, tiny_recipe_file, tmp_path
) -> None:
    dataset, _ = demo_dataset
    cfg = config(dataset, tmp_path / "exp", tiny_recipe_file, seeds=1, arms=("none", "labels"))
    plan = make_plan(cfg)
    victim = plan.segments[("labels", 0)]  # the last segmentation: its inputs are done
    command = [sys.executable, "-m", "pneumo", "experiment", dataset, "--out", cfg.out]
    command += ["--recipe", str(tiny_recipe_file), "--arms", "none,labels", "--seeds", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(tmp_path / "exp" / victim.path / "checkpoints" / "last.pt", proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "exp" / victim.path / "done.json").exists()
    events: list[dict[str, Any]] = []
    run_experiment(cfg, progress=events.append)
    status = {
        e["label"]: e["status"] for e in events if e["event"] == "stage" and e["status"] != "done"
    }
    assert status[victim.label] == "resume"
    before_victim = plan.stages[: plan.stages.index(victim)]
    assert {status[s.label] for s in before_victim} == {"skip"}
    after_victim = plan.stages[plan.stages.index(victim) + 1 :]
    assert {status[s.label] for s in after_victim} == {"run"}
    metrics = (tmp_path / "exp" / victim.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [0, 1]
    assert (tmp_path / "exp" / "table1.csv").exists()
