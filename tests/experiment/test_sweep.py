"""The label-fraction sweep: nested whole-patient subsets of the SIIM training patients
chosen in the training library, stage hashes that carry the fraction (and keep today's at
1), Table 1's column and Figure 2's panel per fraction, the CLI's errors."""

from __future__ import annotations

import csv
import io
import json
import statistics
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.experiment import adapters, run
from pneumo.experiment.plan import Plan, build_plan
from pneumo.experiment.recipe import RecipeError, load_recipe, parse_recipe
from pneumo.experiment.stages import StageContext
from pneumo.shards.errors import ConfigError
from pneumo.shards.selections import SIIM_TEST, SIIM_TRAIN, SIIM_VAL, patient_subset
from pneumo.shards.store import open_store
from pneumo.training import start
from pneumo.training.data import select
from pneumo.training.rows import TRAIN_ROWS, VAL_ROWS, pin_rows
from pneumo.training.runs import RunDir
from pneumo.training.segment import SegmentConfig, SegmentTask

ARMS = ("none", "labels", "pseudo", "leaky")
HELD = ["0123456789abcdef0123", "fedcba9876543210fedc"]
# Stage names of the demo recipe's plan (fingerprint "fp1", the arms above, 2 seeds) as
# pneumo wrote them before the sweep existed: experiment folders of then must resume.
BEFORE = {
    "audit splits": "audit-4bac4a6abd7b",
    "classify labels": "classify-64131d33f1c0",
    "segment none seed 0": "segment-1680d7dca516",
    "evaluate none seed 0": "evaluate-ee7bb1328e39",
    "segment labels seed 1": "segment-05b3acb55ede",
    "evaluate pseudo seed 1": "evaluate-43bec39a32f7",
    "segment leaky seed 1": "segment-f62634116e3a",
}


# ---------------------------------------------------------------- the subsets


def _rows(patients: list[tuple[str, list[bool]]]) -> pa.Table:
    """Manifest-like rows: per patient key, one row per image with its has_ptx."""
    keys, pks, ptx = [], [], []
    for p, images in patients:
        for i, y in enumerate(images):
            keys.append(f"{p}-{i}")
            pks.append(p)
            ptx.append(y)
    return pa.table({"key": keys, "patient_key": pks, "has_ptx": ptx})


def _patients(rows: pa.Table) -> set[str]:
    return set(rows.column("patient_key").to_pylist())


PATIENT_LISTS = st.lists(
    st.tuples(
        st.text("0123456789abcdef", min_size=4, max_size=12),
        st.lists(st.booleans(), min_size=1, max_size=3),
    ),
    min_size=1,
    max_size=40,
    unique_by=lambda p: p[0],
)
FRACTIONS = st.floats(min_value=1e-4, max_value=1.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(PATIENT_LISTS, FRACTIONS, FRACTIONS, st.randoms(use_true_random=False))
def test_subsets_nest_keep_whole_patients_and_a_positive(patients, f1, f2, rng) -> None:
    small, large = sorted((f1, f2))
    rows = _rows(patients)
    a, b = patient_subset(rows, small), patient_subset(rows, large)
    assert _patients(a) <= _patients(b)  # nested
    n = len(patients)
    for subset, f in ((a, small), (b, large)):
        # the rule: the nearest whole number of patients, halves up, at least one
        want = max(1, min(n, int(np.floor(f * n + 0.5))))
        assert len(_patients(subset)) == want
        kept = _patients(subset)
        images = {p: len(im) for p, im in patients}
        assert subset.num_rows == sum(images[p] for p in kept)  # every image of a kept patient
        if any(any(im) for _, im in patients):
            assert any(subset.column("has_ptx").to_pylist())
    shuffled = rows.take(rng.sample(range(rows.num_rows), rows.num_rows))
    assert _patients(patient_subset(shuffled, small)) == _patients(a)  # not the row order


@pytest.mark.parametrize(
    ("n", "fraction", "kept"),
    [(30, 0.1, 3), (30, 0.05, 2), (7, 0.01, 1), (200, 0.01, 2), (10, 1.0, 10), (3, 0.5, 2),
     (10, 0.25, 3)],
)  # fmt: skip
def test_the_number_of_patients_kept(n: int, fraction: float, kept: int) -> None:
    # by hand: 30 x 0.1 = 3; 30 x 0.05 = 1.5 -> 2; 7 x 0.01 -> at least 1; 3 x 0.5 = 1.5 -> 2;
    # 10 x 0.25 = 2.5 -> 3 (halves up, not to even)
    rows = _rows([(f"{i:04x}", [i == 0]) for i in range(n)])
    assert len(_patients(patient_subset(rows, fraction))) == kept


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_fraction_outside_0_1_is_refused(fraction: float) -> None:
    with pytest.raises(ConfigError, match="patient fraction must be in"):
        patient_subset(_rows([("aa", [True])]), fraction)


def test_the_order_is_no_sort_of_the_keys() -> None:
    """The patients of a fraction are drawn across the keys, not the first keys in order."""
    rows = _rows([(f"{i:04x}", [False]) for i in range(100)])
    kept = sorted(_patients(patient_subset(rows, 0.2)))
    assert kept != [f"{i:04x}" for i in range(20)]
    assert kept != [f"{i:04x}" for i in range(80, 100)]


def test_training_pins_a_fraction_of_the_train_patients_and_the_same_val_rows(
    demo_dataset, tmp_path: Path
) -> None:
    """Through the training library: the rows a segmentation run pins at 25% are whole SIIM
    train patients, none of them a val/test patient, and the val rows are the full ones."""
    dataset, _ = demo_dataset
    full = select(dataset, SIIM_TRAIN)
    held = _patients(select(dataset, SIIM_VAL)) | _patients(select(dataset, SIIM_TEST))
    pinned = {}
    for fraction in (0.25, 0.5, 1.0):
        cfg = SegmentConfig(
            dataset=dataset, out=str(tmp_path / str(fraction)), size=64, workers=0,
            train_fraction=fraction,
        )  # fmt: skip
        train, val, _ = pin_rows(SegmentTask(cfg), RunDir(cfg.out), None)
        stored = RunDir(cfg.out)
        assert stored.get_table(TRAIN_ROWS).equals(train)
        assert stored.get_table(VAL_ROWS).equals(select(dataset, SIIM_VAL))
        pinned[fraction] = train
    everyone = _patients(full)
    assert held and not everyone & held
    for fraction, train in pinned.items():
        kept = _patients(train)
        assert len(kept) == max(1, int(fraction * len(everyone) + 0.5))
        assert not kept & held and kept <= everyone
        per_patient = [r for r in full.to_pylist() if r["patient_key"] in kept]
        assert sorted(train.column("key").to_pylist()) == sorted(r["key"] for r in per_patient)
    assert _patients(pinned[0.25]) <= _patients(pinned[0.5]) <= _patients(pinned[1.0])
    assert pinned[1.0].num_rows == full.num_rows


def test_a_run_from_before_the_sweep_resumes_without_naming_the_fraction() -> None:
    """A checkpoint's config from before ``train_fraction`` existed compares equal to
    today's at 1, and unequal at another fraction (the resume check names it)."""
    old = {"dataset": "/d", "where": SIIM_TRAIN, "precision": "bf16"}
    assert start._comparable(old) == start._comparable({**old, "train_fraction": 1.0})
    assert start._comparable(old) != start._comparable({**old, "train_fraction": 0.1})


# ---------------------------------------------------------------- the plan


def _plan(recipe: Any = None, **kw: Any) -> Plan:
    return build_plan(
        recipe or load_recipe("demo"),
        **{"arms": ARMS, "seeds": 2, "dataset_fingerprint": "fp1", "held_out_patients": HELD, **kw},
    )


def _names(plan: Plan) -> dict[str, str]:
    return {s.label: s.name for s in plan.stages}


def test_fraction_1_keeps_the_stage_names_of_before_the_sweep() -> None:
    single, swept = _names(_plan()), _names(_plan(fractions=(0.1, 1.0)))
    for label, name in BEFORE.items():
        assert single[label] == name and swept[label] == name


def test_a_changed_fraction_renames_only_its_segmentations_and_evaluations() -> None:
    a, b = _names(_plan(fractions=(0.1, 1.0))), _names(_plan(fractions=(0.2, 1.0)))
    gone = {label for label in a if label not in b or a[label] != b[label]}
    assert gone == {
        f"{kind} {arm} seed {seed}, 10% of patients"
        for kind in ("segment", "evaluate")
        for arm in ARMS
        for seed in (0, 1)
    }
    assert {a[label] for label in a} & {b[label] for label in b} == {
        a[label] for label in a if label not in gone
    }


def test_every_fraction_trains_the_same_settings_but_the_fraction_and_is_scored_alike() -> None:
    plan = _plan(fractions=(1.0, 0.01, 0.1))
    assert plan.fractions == (0.01, 0.1, 1.0) and plan.main_fraction == 1.0
    assert plan.segments is plan.sweep[1.0].segments
    full = plan.sweep[1.0]
    for fraction in (0.01, 0.1):
        runs = plan.sweep[fraction]
        for key, stage in runs.segments.items():
            settings = dict(stage.settings)
            assert settings.pop("train_fraction") == fraction
            assert settings == dict(full.segments[key].settings)
            assert stage.inputs[1:] == full.segments[key].inputs[1:]  # the same pretraining
            assert runs.evaluations[key].settings == full.evaluations[key].settings
    assert "train_fraction" not in full.segments[("none", 0)].settings


def test_the_report_recipe_sweeps_three_fractions_and_the_demo_one() -> None:
    report, demo = load_recipe("report"), load_recipe("demo")
    assert report.experiment.label_fractions == (0.01, 0.1, 1.0)
    assert demo.experiment.label_fractions == (1.0,)
    plan = build_plan(
        report, arms=report.experiment.arms, seeds=report.experiment.seeds,
        dataset_fingerprint="f", held_out_patients=HELD,
    )  # fmt: skip
    trainings = [s for s in plan.stages if s.kind in ("segment", "classify", "autoencode")]
    # 3 arms x 3 seeds x 3 fractions segmentations; classify labels and pseudo; ae and vae
    assert len([s for s in trainings if s.kind == "segment"]) == 27
    assert len(trainings) == 27 + 2 + 2


@pytest.mark.parametrize(
    ("bad", "why"),
    [("[]", "non-empty list"), ("[0.0, 1.0]", "in (0, 1]"), ("[1.5]", "in (0, 1]"),
     ("[0.1, 0.1]", "names a fraction twice"), ('["a"]', "must be a number")],
)  # fmt: skip
def test_recipe_fractions_are_checked(bad: str, why: str) -> None:
    good = parse_recipe("[experiment]\nlabel_fractions = [0.5, 0.05]\n")
    assert good.experiment.label_fractions == (0.5, 0.05)
    with pytest.raises(RecipeError) as e:
        parse_recipe(f"[experiment]\nlabel_fractions = {bad}\n", "r.toml")
    assert str(e.value).startswith("r.toml: [experiment] label_fractions: ")
    assert why in str(e.value) and "\n" not in str(e.value)


def test_a_segment_stage_hands_its_fraction_to_the_training_library(tmp_path: Path) -> None:
    plan = _plan(fractions=(0.1, 1.0))
    for fraction in (0.1, 1.0):
        stage = plan.sweep[fraction].segments[("none", 0)]
        ctx = StageContext(
            stage=stage, dataset=str(tmp_path), url=str(tmp_path / "s"), inputs={}, input_urls={}
        )
        assert adapters.segment_config(ctx).train_fraction == fraction


# ---------------------------------------------------------------- Table 1 and Figure 2

IDS = ("i1", "i2", "i3", "i4")
SEEDS = (0, 1)
# Per-image Dice by (fraction, arm, seed): the imagenet arm's gain differs per fraction.
DICE = {
    (0.1, "none", 0): (0.1, 0.2, 0.3, 0.4), (0.1, "none", 1): (0.2, 0.2, 0.2, 0.2),
    (0.1, "imagenet", 0): (0.5, 0.2, 0.3, 0.4), (0.1, "imagenet", 1): (0.6, 0.2, 0.2, 0.6),
    (1.0, "none", 0): (0.5, 0.6, 0.7, 0.8), (1.0, "none", 1): (0.6, 0.6, 0.6, 0.6),
    (1.0, "imagenet", 0): (0.5, 0.7, 0.7, 0.9), (1.0, "imagenet", 1): (0.7, 0.6, 0.6, 0.7),
}  # fmt: skip


def _dataset(root: Path, write_shards: Any) -> str:
    png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    rows = [
        {"key": f"k{i}", "image_id": image, "dataset": "siim", "split": "test",
         "has_ptx": False, "rows": 8, "cols": 8, "image_format": "png", "bit_depth": 8,
         "patient_key": f"patient-{i}", "patient_basis": "nih-xref"}
        for i, image in enumerate(IDS)
    ]  # fmt: skip
    write_shards(root, rows, lambda row: {"png": png}, per_shard=4, one_shard=True)
    return str(root)


@pytest.fixture
def swept(tmp_path: Path, write_shards: Any) -> dict[str, Any]:
    """A two-fraction plan's stage folders holding hand-made evaluations and curves."""
    recipe = parse_recipe("[experiment]\nbootstrap_resamples = 200\nlabel_fractions = [0.1, 1.0]\n")
    plan = build_plan(
        recipe, arms=("none", "imagenet"), seeds=2, dataset_fingerprint="f",
        held_out_patients=["p"], imagenet_sha256="ab" * 32,
    )  # fmt: skip
    exp = open_store(str(tmp_path / "exp"))
    runs = tmp_path / "runs"
    runs.mkdir()
    results = {}
    for fraction, fr in plan.sweep.items():
        for (arm, seed), stage in fr.evaluations.items():
            dice = DICE[(fraction, arm, seed)]
            summary = {"dice": statistics.mean(dice), "dice_pos": 0.1 * seed + fraction,
                       "empty_baseline_dice": 0.5, "n_images": 4, "n_positive": 2}  # fmt: skip
            (runs / f"{fraction}-{arm}-{seed}.json").write_text(json.dumps(summary))
            results[stage.name] = summary
            buf = io.BytesIO()
            keys = [f"k{i}" for i in range(len(IDS))]
            pq.write_table(pa.table({"image_id": list(IDS), "key": keys, "dice": list(dice)}), buf)
            exp.put(f"{stage.path}/per_image.parquet", buf.getvalue())
        for stage in fr.segments.values():
            lines = [json.dumps({"epoch": e, "val_dice": 0.1 * (e + 1)}) for e in range(3)]
            exp.put(f"{stage.path}/metrics.jsonl", "\n".join(lines).encode())
    cfg = SimpleNamespace(recipe=recipe, dataset=_dataset(tmp_path / "data", write_shards))
    return {"plan": plan, "cfg": cfg, "exp": exp, "runner": SimpleNamespace(results=results),
            "runs": runs, "root": tmp_path / "exp"}  # fmt: skip


def test_table1_has_a_column_per_fraction_with_the_runs_numbers(swept) -> None:
    rows, _, table = run._segmentation_outputs(
        swept["exp"], swept["cfg"], swept["plan"], swept["runner"]
    )
    exp: Path = swept["root"]
    csv_rows = {r["arm"]: r for r in csv.DictReader(io.StringIO((exp / "table1.csv").read_text()))}
    assert set(csv_rows) == {"none", "imagenet"}
    for arm in ("none", "imagenet"):
        for fraction, tag in ((0.1, "0.1"), (1.0, "1")):
            # from the per-run JSON files alone
            per_run = [
                json.loads((swept["runs"] / f"{fraction}-{arm}-{s}.json").read_text())["dice"]
                for s in SEEDS
            ]
            row = csv_rows[arm]
            assert float(row[f"dice_mean_at_{tag}"]) == pytest.approx(
                statistics.mean(per_run), abs=1e-12
            )
            assert float(row[f"dice_sd_at_{tag}"]) == pytest.approx(
                statistics.stdev(per_run), abs=1e-12
            )
            if arm == "imagenet":
                diff = statistics.mean(
                    DICE[(fraction, arm, s)][i] - DICE[(fraction, "none", s)][i]
                    for s in SEEDS for i in range(4)
                )  # fmt: skip
                assert float(row[f"diff_to_none_at_{tag}"]) == pytest.approx(diff, abs=1e-12)
                assert float(row[f"ci_low_at_{tag}"]) <= diff <= float(row[f"ci_high_at_{tag}"])
            else:
                assert row[f"diff_to_none_at_{tag}"] == ""
        # the main columns are the largest fraction's
        assert csv_rows[arm]["dice_mean"] == csv_rows[arm]["dice_mean_at_1"]
    lines = table.splitlines()
    assert (
        "| Dice, 10% of patients (Δ [95% CI]) | Dice, 100% of patients (Δ [95% CI]) |" in lines[0]
    )
    assert lines[1].count("---") == len(lines[0].split("|")) - 2
    imagenet = next(line for line in lines if line.startswith("| Pretrain on ImageNet"))
    cells = [c.strip() for c in imagenet.split("|")[1:-1]]
    gain = statistics.mean(DICE[(0.1, "imagenet", s)][i] - DICE[(0.1, "none", s)][i]
                           for s in SEEDS for i in range(4))  # fmt: skip
    mean = statistics.mean(statistics.mean(DICE[(0.1, "imagenet", s)]) for s in SEEDS)
    assert cells[-2].startswith(f"{100 * mean:.1f} ± ")
    assert f"({100 * gain:+.1f} [" in cells[-2]
    assert [r.arm for r in rows] == ["none", "imagenet"]


def _png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


def test_figure2_has_a_panel_per_fraction(swept) -> None:
    run._segmentation_outputs(swept["exp"], swept["cfg"], swept["plan"], swept["runner"])
    two = swept["exp"].get(run.FIGURE2)
    one = run.figures.dice_curves_figure({1.0: {"none": [[0.1, 0.2]]}})
    (w2, h2), (w1, h1) = _png_size(two), _png_size(one)
    assert h1 == h2 and w2 == 2 * w1  # two panels of the one panel's size


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ("0.1,abc", "error: --label-fractions '0.1,abc': give comma-separated numbers in (0, 1]"),
        ("0,1", "error: --label-fractions 0.0,1.0: give distinct fractions"),
        ("0.5,0.5", "error: --label-fractions 0.5,0.5: give distinct fractions"),
        ("1.2", "error: --label-fractions 1.2: give distinct fractions"),
    ],
)
def test_the_cli_refuses_bad_fractions_in_one_line(
    tmp_path: Path, option: str, needle: str
) -> None:
    result = CliRunner().invoke(
        app,
        ["experiment", str(tmp_path), "--out", str(tmp_path / "e"), "--label-fractions", option],
    )
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(needle), result.stderr
