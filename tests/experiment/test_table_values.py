"""The numbers in Table 1, the leakage line, the pretraining table and ``dice_table`` are
the numbers of the runs: every printed figure is compared with one computed here, by hand,
from small per-run JSON files and per-image results with known values.

Table 1 is built the way ``pneumo experiment`` builds it (``run._segmentation_outputs``
over a real plan's stage folders and a real dataset's manifest, which holds the patient
keys), so a wrong pairing between the runs and the table, or the leakage difference taken
the wrong way round, shows as a wrong number. The intervals are checked against the exact
bootstrap distribution, enumerated here over every draw of patients and seeds.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import statistics
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pneumo.evaluation.report import dice_table
from pneumo.experiment import run
from pneumo.experiment.plan import Plan, build_plan
from pneumo.experiment.recipe import parse_recipe
from pneumo.shards.store import open_store

ARMS = ("none", "labels", "pseudo", "leaky")
SEEDS = (0, 1)
IDS = ("i1", "i2", "i3", "i4")
# i1 and i2 are two images of one patient: the intervals resample 3 patients.
PATIENTS = {"i1": "pa", "i2": "pa", "i3": "pb", "i4": "pc"}
# Per-image Dice of each arm and seed. labels: none + 0.10 everywhere; leaky: labels + 0.04
# everywhere (so the leak is +4.0 points); pseudo: none + 0.2 on patient pa's two images
# and + 0 on the others (a mean of +10.0). Seed 1 is 10 points below seed 0 in every arm.
NONE = {0: (0.50, 0.50, 0.50, 0.50), 1: (0.40, 0.40, 0.40, 0.40)}
PER_IMAGE = {
    ("none", s): NONE[s] for s in SEEDS
} | {
    ("labels", s): tuple(d + 0.10 for d in NONE[s]) for s in SEEDS
} | {
    ("leaky", s): tuple(d + 0.14 for d in NONE[s]) for s in SEEDS
} | {
    ("pseudo", s): tuple(d + g for d, g in zip(NONE[s], (0.2, 0.2, 0.0, 0.0), strict=True))
    for s in SEEDS
}  # fmt: skip
DICE_POS = {
    ("none", 0): 0.20, ("none", 1): 0.30, ("labels", 0): 0.31, ("labels", 1): 0.45,
    ("pseudo", 0): 0.28, ("pseudo", 1): 0.40, ("leaky", 0): 0.50, ("leaky", 1): 0.44,
}  # fmt: skip
TITLES = {
    "none": "No additional pretrain",
    "labels": "Pretrain with labels",
    "pseudo": "Pretrain with pseudo-labels",
    "leaky": "Pretrain with labels + SIIM val/test patients (leaky)",
}
REPORT = {"none": 71.6, "labels": 76.4, "pseudo": 75.8, "leaky": None}

NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def _numbers(text: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(text)]


def _dataset(root: Path, write_shards: Any) -> str:
    """A dataset whose manifest holds the four test images and their patient keys."""
    png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    rows = [
        {"key": f"k{i}", "image_id": image, "dataset": "siim", "split": "test",
         "has_ptx": False, "rows": 8, "cols": 8, "image_format": "png", "bit_depth": 8,
         "patient_key": f"hash-{PATIENTS[image]}", "patient_basis": "nih-xref"}
        for i, image in enumerate(IDS)
    ]  # fmt: skip
    write_shards(root, rows, lambda row: {"png": png}, per_shard=4, one_shard=True)
    return str(root)


@pytest.fixture
def experiment(tmp_path: Path, write_shards: Any) -> dict[str, Any]:
    """A plan's stage folders holding hand-made evaluations, and the per-run JSON files.

    20,000 resamples: every interval below ends at least 1% of the exact distribution (200
    resamples, against a binomial sd of at most 35) away from a boundary between values."""
    recipe = parse_recipe("[experiment]\nbootstrap_resamples = 20000\nconfidence = 0.9\n")
    plan = build_plan(
        recipe, arms=ARMS, seeds=len(SEEDS), dataset_fingerprint="f", held_out_patients=["p"]
    )
    exp = open_store(str(tmp_path / "exp"))
    runs = tmp_path / "runs"
    runs.mkdir()
    results: dict[str, dict[str, Any]] = {}
    for (arm, seed), stage in plan.evaluations.items():
        dice = PER_IMAGE[(arm, seed)]
        summary = {
            "dice": sum(dice) / len(dice),
            "dice_pos": DICE_POS[(arm, seed)],
            "empty_baseline_dice": 0.5,
            "n_images": 4,
            "n_positive": 2,
        }
        (runs / f"{arm}-{seed}.json").write_text(json.dumps(summary))
        results[stage.name] = json.loads((runs / f"{arm}-{seed}.json").read_text())
        buf = io.BytesIO()
        keys = [f"k{i}" for i in range(len(IDS))]
        pq.write_table(pa.table({"image_id": list(IDS), "key": keys, "dice": list(dice)}), buf)
        exp.put(f"{stage.path}/per_image.parquet", buf.getvalue())
    for stage in plan.segments.values():
        rows = [{"epoch": e, "val_dice": 0.1 * (e + 1)} for e in range(2)]
        exp.put(f"{stage.path}/metrics.jsonl", "\n".join(map(json.dumps, rows)).encode())
    return {
        "plan": plan,
        "cfg": SimpleNamespace(recipe=recipe, dataset=_dataset(tmp_path / "data", write_shards)),
        "exp": exp,
        "runner": SimpleNamespace(results=results),
        "runs": runs,
    }


def _exact(arm: list[dict], base: list[dict] | None, level: float) -> tuple[float, float]:
    """The percentile interval of the exact two-level bootstrap distribution: every ordered
    draw of the patients (all images of a drawn patient, the mean over the drawn images),
    times every ordered draw of each arm's seeds, equally likely. Checks that neither end
    lies within 1% of a boundary between values (where a Monte Carlo quantile may fall
    on either side)."""
    patients = sorted(set(PATIENTS.values()))

    def values(runs: list[dict], images: list[str]) -> list[float]:
        means = [statistics.mean(run[i] for i in images) for run in runs]
        draws = itertools.product(means, repeat=len(means))
        return [statistics.mean(d) for d in draws]

    outcomes: Counter[float] = Counter()
    for drawn in itertools.product(patients, repeat=len(patients)):
        images = [i for p in drawn for i in IDS if PATIENTS[i] == p]
        base_values = values(base, images) if base else [0.0]
        for a in values(arm, images):
            outcomes.update(round(a - b, 9) for b in base_values)
    total, alpha, cumulative = sum(outcomes.values()), (1 - level) / 2, 0.0
    ends = []
    for value in sorted(outcomes):
        before, cumulative = cumulative, cumulative + outcomes[value] / total
        for tail in (alpha, 1 - alpha):
            if before < tail < cumulative:
                assert min(tail - before, cumulative - tail) > 0.01, (value, tail)
                ends.append(value)
    assert len(ends) == 2
    return ends[0], ends[1]


def _expected(runs: Path) -> dict[str, dict[str, Any]]:
    """Per arm, from the per-run JSON and the per-image values alone (fractions)."""
    out: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        summaries = [json.loads((runs / f"{arm}-{s}.json").read_text()) for s in SEEDS]
        dice = [r["dice"] for r in summaries]
        pos = [r["dice_pos"] for r in summaries]
        per_image_diff = [
            statistics.mean(PER_IMAGE[(arm, s)][i] - PER_IMAGE[("none", s)][i] for s in SEEDS)
            for i in range(len(IDS))
        ]
        out[arm] = {
            "dice_mean": statistics.mean(dice),
            "dice_sd": statistics.stdev(dice),
            "dice_pos_mean": statistics.mean(pos),
            "dice_pos_sd": statistics.stdev(pos),
            "diff": statistics.mean(per_image_diff),
            "ci": _exact(_runs(arm), _runs("none"), 0.9),
            "dice_ci": _exact(_runs(arm), None, 0.9),
        }
    return out


def _runs(arm: str) -> list[dict[str, float]]:
    return [dict(zip(IDS, PER_IMAGE[(arm, s)], strict=True)) for s in SEEDS]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_table1_prints_the_runs_numbers(experiment: dict[str, Any]) -> None:
    rows, leakage, table = run._segmentation_outputs(
        experiment["exp"], experiment["cfg"], experiment["plan"], experiment["runner"]
    )
    expected = _expected(experiment["runs"])
    exp = experiment["exp"]
    assert exp.get(run.TABLE1_MD).decode() == table
    lines = table.splitlines()
    assert _cells(lines[0])[4] == "Δ vs none [90% CI]"  # the recipe's confidence
    body = {_cells(line)[0]: _cells(line) for line in lines[2:] if line.startswith("|")}
    assert list(body) == [TITLES[a] for a in ARMS]
    for arm in ARMS:
        _title, report, dice, pos, delta, seeds, images = body[TITLES[arm]]
        e = expected[arm]
        assert report == ("—" if REPORT[arm] is None else f"{REPORT[arm]:.1f}")
        assert _numbers(dice) == pytest.approx(
            [100 * e["dice_mean"], 100 * e["dice_sd"], *(100 * x for x in e["dice_ci"])],
            abs=0.051,
        )
        assert _numbers(pos) == pytest.approx(
            [100 * e["dice_pos_mean"], 100 * e["dice_pos_sd"]], abs=0.051
        )
        if arm == "none":
            assert delta == "—"
        else:
            assert _numbers(delta) == pytest.approx(
                [100 * e["diff"], 100 * e["ci"][0], 100 * e["ci"][1]], abs=0.051
            )
        assert (int(seeds), _numbers(images)) == (2, [4, 2])
    # the hand-made values, spelled out once: a wrong expectation would show here
    # labels - none: +10 + 5 * (a - b) points, a and b in {1, 0, -1} at 1/4, 1/2, 1/4 (the
    # seeds each arm draws): -2 and +2 have 1/16 each, beyond the 5% tails
    assert body[TITLES["labels"]][4] == "+10.0 [+0.0, +20.0]"
    # pseudo - none: the share of patient pa's images among the drawn, times 20 points
    # (0, 10, 16 or 20 for 0-3 draws of pa), plus the seeds' 5 * (a - b)
    assert body[TITLES["pseudo"]][4] == "+10.0 [-5.0, +21.0]"
    assert body[TITLES["leaky"]][4] == "+14.0 [+4.0, +24.0]"
    # none: seed means 50 and 40, drawn twice: 40 (1/4), 45 (1/2), 50 (1/4)
    assert body[TITLES["none"]][2] == "45.0 ± 7.1 [40.0, 50.0]"

    empty = next(line for line in lines if line.startswith("Predicting no pneumothorax"))
    assert _numbers(empty) == [50.0]
    assert "Δ: difference to the none arm, paired by image" in table
    ci_note = next(line for line in lines if line.startswith("90% CI:"))
    assert "(20,000 resamples) of test patients (all images of a drawn patient" in ci_note
    assert "and each arm's seeds" in ci_note
    assert ci_note.endswith(": 3 patients, 4 images, 2 seeds per arm.")

    # the leakage line: leaky − labels, +4.0 points on every image; the seeds as above
    leak = next(line for line in lines if line.startswith("Leakage effect"))
    assert leak == "Leakage effect (leaky − labels): +4.0 [-6.0, +14.0]."
    assert (leakage.arm, leakage.base) == ("leaky", "labels")
    assert (leakage.mean, leakage.low, leakage.high) == pytest.approx((0.04, -0.06, 0.14))
    assert (leakage.n_patients, leakage.n_images, leakage.seeds) == (3, 4, 2)

    # the CSV: full precision, the same numbers
    with io.StringIO(exp.get(run.TABLE1_CSV).decode()) as f:
        csv_rows = {r["arm"]: r for r in csv.DictReader(f)}
    assert list(csv_rows) == list(ARMS)
    for arm in ARMS:
        r, e = csv_rows[arm], expected[arm]
        for name in ("dice_mean", "dice_sd", "dice_pos_mean", "dice_pos_sd"):
            assert float(r[name]) == pytest.approx(e[name], abs=1e-12), (arm, name)
        assert (int(r["seeds"]), int(r["n_images"]), int(r["n_positive"])) == (2, 4, 2)
        assert float(r["empty_dice"]) == 0.5
        assert (int(r["n_patients"]), int(r["resamples"])) == (3, 20000)
        got_ci = [float(r["dice_low"]), float(r["dice_high"])]
        assert got_ci == pytest.approx(list(e["dice_ci"]), abs=1e-12), arm
        assert r["title"] == TITLES[arm]
        assert r["report_dice"] == ("" if REPORT[arm] is None else str(REPORT[arm]))
        if arm == "none":
            assert (r["diff_to_none"], r["ci_low"], r["ci_high"]) == ("", "", "")
        else:
            got = [float(r["diff_to_none"]), float(r["ci_low"]), float(r["ci_high"])]
            assert got == pytest.approx([e["diff"], *e["ci"]], abs=1e-12), arm
    assert [r.arm for r in rows] == list(ARMS)


def test_the_leakage_line_is_leaky_minus_labels_of_the_per_run_results(
    experiment: dict[str, Any],
) -> None:
    """From the files alone: the per-run JSON summaries give the estimate, the per-image
    Parquet tables in the evaluation folders the exact bootstrap interval."""
    _rows, _leakage, table = run._segmentation_outputs(
        experiment["exp"], experiment["cfg"], experiment["plan"], experiment["runner"]
    )
    runs, exp, plan = experiment["runs"], experiment["exp"], experiment["plan"]

    def dice(arm: str) -> float:
        return statistics.mean(
            json.loads((runs / f"{arm}-{s}.json").read_text())["dice"] for s in SEEDS
        )

    def per_image(arm: str) -> list[dict[str, float]]:
        out = []
        for s in SEEDS:
            t = pq.read_table(
                io.BytesIO(exp.get(f"{plan.evaluations[(arm, s)].path}/per_image.parquet"))
            )
            out.append(dict(zip(t["image_id"].to_pylist(), t["dice"].to_pylist(), strict=True)))
        return out

    low, high = _exact(per_image("leaky"), per_image("labels"), 0.9)
    leak = next(line for line in table.splitlines() if line.startswith("Leakage effect"))
    printed = _numbers(leak.split(":", 1)[1])
    assert printed == pytest.approx(
        [100 * (dice("leaky") - dice("labels")), 100 * low, 100 * high], abs=0.051
    )
    assert printed[0] > 0  # the data: leaky is 4 points above labels (a swap reads -4.0)


def test_pretraining_table_prints_the_classifier_and_cluster_numbers(
    experiment: dict[str, Any],
) -> None:
    plan: Plan = experiment["plan"]
    evaluations = {
        "labels": {"auroc": 0.8123, "balanced_accuracy": 0.705, "accuracy": 0.912,
                   "majority_rate": 0.953, "n_images": 200},
        "pseudo": {"auroc": 0.6345, "balanced_accuracy": 0.3191, "accuracy": 0.452,
                   "majority_rate": 0.21, "n_images": 180},
        "leaky": {"auroc": 0.9001, "balanced_accuracy": 0.8, "accuracy": 0.95,
                  "majority_rate": 0.953, "n_images": 200},
    }  # fmt: skip
    cluster = {"method": "dbscan", "clusters": 3, "sizes": [5, 12, 7], "noise_share": 0.125,
               "majority_share": 0.5, "noise_label": 3}  # fmt: skip
    results = experiment["runner"].results
    for arm, stage in plan.classifier_evals.items():
        results[stage.name] = evaluations[arm]
    assert plan.cluster is not None
    results[plan.cluster.name] = cluster
    table = run._pretraining_outputs(experiment["exp"], plan, experiment["runner"])
    assert experiment["exp"].get(run.PRETRAIN_MD).decode() == table
    body = {_cells(line)[0]: _cells(line) for line in table.splitlines()[2:5]}
    assert set(body) == {TITLES[a] for a in evaluations}
    for arm, e in evaluations.items():
        _title, classes, auroc, balanced, accuracy, majority, n = body[TITLES[arm]]
        # 3 clusters and the noise kept as a class of its own: 4 classes
        assert classes == ("4 pseudo-classes" if arm == "pseudo" else "pneumothorax")
        assert float(auroc) == pytest.approx(e["auroc"], abs=0.0005)
        assert float(balanced) == pytest.approx(100 * e["balanced_accuracy"], abs=0.051)
        assert float(accuracy) == pytest.approx(100 * e["accuracy"], abs=0.051)
        assert float(majority) == pytest.approx(100 * e["majority_rate"], abs=0.051)
        assert int(n) == e["n_images"]
    line = next(x for x in table.splitlines() if x.startswith("Clusters:"))
    # 3 clusters, sizes largest first, noise share 12.5%, largest-cluster share 50%
    assert _numbers(line) == pytest.approx([3, 12, 7, 5, 12.5, 50.0])
    assert "(dbscan)" in line
    with io.StringIO(experiment["exp"].get(run.PRETRAIN_CSV).decode()) as f:
        csv_rows = {r["arm"]: r for r in csv.DictReader(f)}
    for arm, e in evaluations.items():
        for name, value in e.items():
            assert float(csv_rows[arm][name]) == pytest.approx(value, abs=1e-12), (arm, name)


def test_dice_table_prints_each_summary_in_its_column() -> None:
    summaries = [
        ("model-a", {"dice": 0.8234, "empty_baseline_dice": 0.7312, "dice_pos": 0.4123,
                     "sensitivity": 0.655, "specificity": 0.9177, "n_images": 120,
                     "n_positive": 33}),
        ("model-b", {"dice": 0.7001, "empty_baseline_dice": 0.7312, "dice_pos": None,
                     "sensitivity": 0.25, "specificity": 1.0, "n_images": 120,
                     "n_positive": 33}),
    ]  # fmt: skip
    lines = dice_table(summaries).splitlines()
    assert lines[0].split() == ["Model", "Dice", "Empty", "Dice+", "Sens", "Spec", "Images", "Pos"]
    fields = ("dice", "empty_baseline_dice", "dice_pos", "sensitivity", "specificity")
    for line, (name, summary) in zip(lines[2:4], summaries, strict=True):
        cells = line.split()
        assert cells[0] == name
        for cell, key in zip(cells[1:6], fields, strict=True):
            value = summary[key]
            if value is None:
                assert cell == "-"
            else:
                assert float(cell) == pytest.approx(100 * value, abs=0.051), (name, key)
        assert (int(cells[6]), int(cells[7])) == (summary["n_images"], summary["n_positive"])
    legend = {line.split()[0]: line.split()[1].rstrip(":") for line in lines[5:12]}
    assert legend == {
        "Dice": "dice", "Empty": "empty_baseline_dice", "Dice+": "dice_pos",
        "Sens": "sensitivity", "Spec": "specificity", "Images": "n_images", "Pos": "n_positive",
    }  # fmt: skip
