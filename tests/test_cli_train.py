"""The model commands as a user runs them: train (also under torchrun), evaluate, predict, bench."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, pneumo) -> Path:
    root = tmp_path_factory.mktemp("cli-train")
    pneumo("demo-data", "siim", str(root / "raw"), "--n", "40", "--size", "256")
    pneumo(
        "ingest",
        "siim",
        str(root / "raw" / "dicom-images-train"),
        "--labels",
        str(root / "raw" / "train-rle.csv"),
        "--out",
        str(root / "ds"),
        "--split-fractions",
        "0.6,0.2,0.2",
    )
    return root / "ds"


@pytest.fixture(scope="module")
def run(dataset, pneumo) -> Path:
    out = dataset.parent / "run"
    proc = pneumo(
        "train",
        "segment",
        str(dataset),
        "--out",
        str(out),
        "--size",
        "64",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "3",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--warmup-steps",
        "1",
    )
    assert "step 6/6" in proc.stdout
    # Not a terminal: no bar, one line per epoch with the validation figures.
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"], proc.stderr
    assert "val_dice" in epochs[-1] and "img/s" in epochs[-1]
    return out


def test_train_writes_a_self_describing_run(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1] and lines[-1]["step"] == 6
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "checkpoints" / "last.pt").is_file()
    post = json.loads((run / "postprocess.json").read_text())
    search = json.loads((run / "postprocess_search.json").read_text())
    assert {"top_threshold", "min_area", "mask_threshold", "tta", "val_dice"} <= set(post)
    # The better of the two searches (with and without flip TTA) is the one kept.
    by_tta = search["by_tta"]
    assert sorted(x["tta"] for x in by_tta) == [False, True]
    assert post["val_dice"] == max(x["val_dice"] for x in by_tta)


def test_evaluate_json(run, pneumo):
    summary = json.loads(
        pneumo(
            "evaluate", "segment", str(run), "--split", "test", "--format", "json", "--workers", "0"
        ).stdout
    )
    assert {"dice", "dice_pos", "empty_baseline_dice", "n_images"} <= set(summary)
    assert summary["n_images"] > 0 and summary["resolution"] == "full"
    assert summary["init"] == "random init (seed 0)"
    table = pneumo("evaluate", "segment", str(run), "--tta", "--workers", "0").stdout
    assert "dice_pos" in table  # the legend names each column's JSON field
    # The run's row shows the all-empty baseline of the same images beside the model.
    heads, _, row = table.splitlines()[:3]
    assert heads.split()[:3] == ["Model", "Dice", "Empty"] and row.split()[0] == run.name
    assert row.split()[2] == f"{100 * summary['empty_baseline_dice']:.1f}"
    assert "random init (seed 0)" in table  # where the weights came from


def test_predict_real_dicoms_to_a_submission(run, shared_data, tmp_path, pneumo):
    src = tmp_path / "in"
    shutil.copytree(shared_data / "siim" / "stage2_test", src)
    (src / "broken.dcm").write_bytes(b"not a dicom")
    out = tmp_path / "submission.csv"
    proc = pneumo(
        "predict", str(run), str(src), "--out", str(out), "--overlays", str(tmp_path / "overlays")
    )
    assert "broken.dcm" in proc.stderr  # reported, and the rest went on
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and all(r["ImageId"].startswith("ID_") for r in rows)
    assert all(r["EncodedPixels"] == "-1" or len(r["EncodedPixels"].split()) % 2 == 0 for r in rows)
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 10


def test_bench_loader_last_line(dataset, pneumo):
    out = (
        pneumo(
            "bench",
            "loader",
            str(dataset),
            "--size",
            "64",
            "--seconds",
            "1",
            "--workers",
            "0",
            "--batch-size",
            "4",
        )
        .stdout.strip()
        .splitlines()
    )
    assert out[-1].startswith("samples/s: ") and float(out[-1].split()[-1]) > 0


def test_torchrun_two_processes_run_the_same_command(dataset, tmp_path, free_port):
    torchrun = Path(sys.executable).parent / "torchrun"
    script = shutil.which("pneumo", path=str(Path(sys.executable).parent))
    assert script, "the pneumo console script is installed next to the interpreter"
    out = tmp_path / "ddp-run"
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port),
            script,
            "train",
            "segment",
            str(dataset),
            "--out",
            str(out),
            "--size",
            "64",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--workers",
            "1",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["batches_per_rank"] == [2, 2]


@pytest.fixture(scope="module")
def nih_dataset(tmp_path_factory, pneumo) -> Path:
    root = tmp_path_factory.mktemp("cli-classify")
    pneumo("demo-data", "nih", str(root / "raw"), "--n", "48", "--size", "64")
    pneumo(
        "ingest", "nih", str(root / "raw"), "--labels", str(root / "raw" / "Data_Entry_2017.csv"),
        "--out", str(root / "ds"), "--split-fractions", "0.5,0.25,0.25",
    )  # fmt: skip
    return root / "ds"


CLASSIFY = ["--size", "64", "--arch", "resnet18", "--batch-size", "4", "--steps-per-epoch", "2"]


def test_train_and_evaluate_classify(nih_dataset, tmp_path, pneumo):
    out = tmp_path / "cls"
    proc = pneumo(
        "train", "classify", str(nih_dataset), "--out", str(out), "--epochs", "2",
        "--workers", "0", *CLASSIFY,
    )  # fmt: skip
    assert "step 4/4" in proc.stdout and "majority rate" in proc.stdout
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and "val_auroc" in epochs[0] and "val_majority_rate" in epochs[0]
    summary = json.loads(
        pneumo("evaluate", "classify", str(out), "--format", "json", "--workers", "0").stdout
    )
    assert {"auroc", "accuracy", "balanced_accuracy", "majority_rate", "n_images"} <= set(summary)
    assert summary["n_images"] == len(pq.read_table(out / "eval" / "test.parquet"))
    assert (out / "eval" / "test-roc.png").stat().st_size > 1000
    # The same command again resumes (--resume auto) a finished run: nothing to redo.
    again = pneumo(
        "train", "classify", str(nih_dataset), "--out", str(out), "--epochs", "2",
        "--workers", "0", *CLASSIFY,
    )  # fmt: skip
    assert "step 4/4" in again.stdout and not [
        line for line in again.stderr.splitlines() if line.startswith("epoch ")
    ]
    refused = pneumo(
        "train", "classify", str(nih_dataset), "--out", str(out), "--epochs", "2",
        "--workers", "0", "--seed", "3", *CLASSIFY, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("error: cannot resume")
    assert "--seed 0 (now 3)" in refused.stderr


def test_torchrun_two_processes_classify_with_equal_steps(nih_dataset, tmp_path, free_port):
    torchrun = Path(sys.executable).parent / "torchrun"
    script = shutil.which("pneumo", path=str(Path(sys.executable).parent))
    out = tmp_path / "ddp-cls"
    proc = subprocess.run(
        [
            str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port), script,
            "train", "classify", str(nih_dataset), "--out", str(out), "--epochs", "1",
            "--workers", "1", *CLASSIFY,
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["batches_per_rank"] == [2, 2]
    assert metrics["lr_per_rank"] == [0.001, 0.001]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
