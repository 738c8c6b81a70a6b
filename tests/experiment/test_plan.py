"""The stage graph: same segmentation for every arm, and a changed setting renames only
the stages that depend on it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pneumo.experiment.plan import Plan, build_plan
from pneumo.experiment.recipe import load_recipe
from pneumo.shards.errors import ConfigError

ARMS = ("none", "labels", "pseudo", "leaky")
HELD = ["0123456789abcdef0123", "fedcba9876543210fedc"]


def plan_of(recipe, fingerprint: str = "fp1", seeds: int = 2) -> Plan:
    return build_plan(
        recipe, arms=ARMS, seeds=seeds, dataset_fingerprint=fingerprint, held_out_patients=HELD
    )


def names(plan: Plan) -> dict[str, str]:
    return {s.label: s.name for s in plan.stages}


def changed(a: Plan, b: Plan) -> set[str]:
    before, after = names(a), names(b)
    assert before.keys() == after.keys()
    return {label for label in before if before[label] != after[label]}


def test_every_arm_segments_with_the_same_settings_only_the_encoder_differs() -> None:
    plan = plan_of(load_recipe("demo"))
    for seed in plan.seeds:
        runs = [plan.segments[(arm, seed)] for arm in ARMS]
        assert all(r.settings == runs[0].settings for r in runs)
        assert runs[0].settings["seed"] == seed
        assert [dict(r.inputs).get("encoder") for r in runs] == [
            None,
            plan.encoders["labels"],
            plan.encoders["pseudo"],
            plan.encoders["leaky"],
        ]
        evals = [plan.evaluations[(arm, seed)] for arm in ARMS]
        assert all(e.settings == evals[0].settings for e in evals)
        assert evals[0].settings["split"] == "test"


def test_stages_come_after_their_inputs_once_each() -> None:
    plan = plan_of(load_recipe("demo"))
    position = {s.name: i for i, s in enumerate(plan.stages)}
    # audit; 3 classifiers and their evaluations; ae, vae, embed, cluster; 4 arms x 2 seeds
    # x (segment, evaluate)
    assert len(position) == len(plan.stages) == 1 + 3 * 2 + 4 + 4 * 2 * 2
    for stage in plan.stages:
        assert all(position[s.name] < position[stage.name] for _, s in stage.inputs)
    assert plan.stages[0] is plan.audit
    # one pretraining per arm serves every seed
    assert len({s.name for s in plan.stages if s.kind == "classify"}) == 3


def test_a_segmentation_setting_renames_only_segmentation_and_evaluation() -> None:
    recipe = load_recipe("demo")
    other = replace(recipe, segment=replace(recipe.segment, lr=recipe.segment.lr / 2))
    assert changed(plan_of(recipe), plan_of(other)) == {
        f"{kind} {arm} seed {seed}"
        for kind in ("segment", "evaluate")
        for arm in ARMS
        for seed in (0, 1)
    }


def test_a_cluster_setting_renames_the_pseudo_arm_downstream_of_clustering() -> None:
    recipe = load_recipe("demo")
    other = replace(recipe, cluster=replace(recipe.cluster, min_samples=7))
    assert changed(plan_of(recipe), plan_of(other)) == {
        "cluster",
        "classify pseudo",
        "evaluate classify pseudo",
        "segment pseudo seed 0",
        "segment pseudo seed 1",
        "evaluate pseudo seed 0",
        "evaluate pseudo seed 1",
    }


def test_new_data_renames_everything_and_more_seeds_add_stages_only() -> None:
    recipe = load_recipe("demo")
    assert changed(plan_of(recipe), plan_of(recipe, fingerprint="fp2")) == set(
        names(plan_of(recipe))
    )
    two, three = names(plan_of(recipe, seeds=2)), names(plan_of(recipe, seeds=3))
    assert {k: three[k] for k in two} == two


def test_the_leaky_arm_differs_from_labels_only_by_the_held_out_patients() -> None:
    plan = plan_of(load_recipe("demo"))
    leaky, labels = plan.encoders["leaky"].settings, plan.encoders["labels"].settings
    assert leaky["allow_overlap"] and not labels["allow_overlap"]
    held = "['0123456789abcdef0123', 'fedcba9876543210fedc']"
    assert leaky["where"] == f"({labels['where']}) or (dataset == 'nih' and patient_key in {held})"
    different = {k for k in leaky if leaky[k] != labels[k]}
    assert different == {"where", "allow_overlap"}


def test_embed_source_must_be_trained() -> None:
    recipe = load_recipe("demo")
    bad = replace(recipe, autoencode=replace(recipe.autoencode, kinds=("ae",)))
    with pytest.raises(ConfigError, match=r"\[embed\] source = 'vae'"):
        plan_of(bad)
