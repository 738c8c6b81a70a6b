"""Calibration in ``pneumo evaluate`` and ``pneumo predict``: ECE and the reliability diagram,
a temperature fitted on val rows only, applied by predict, and the flip uncertainty.

Expected values are computed here with plain numpy (a ceil-based binning, the logistic
formula), not with :mod:`pneumo.metrics.calibration`, except the 1-D fit itself, which
is tested on its own in tests/metrics/test_calibration.py and is used here only to tell
which rows a stored temperature was fitted on.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pneumo.evaluation import calibration
from pneumo.evaluation.calibration import fit_and_store, flip_probabilities, load_temperature
from pneumo.evaluation.classify import EvaluateClassifyConfig, evaluate_classify
from pneumo.evaluation.evaluate import EvaluateConfig, evaluate_segment
from pneumo.evaluation.inference import Predictor
from pneumo.evaluation.predict import PredictConfig, predict
from pneumo.metrics.calibration import fit_temperature
from pneumo.shards.errors import ConfigError
from pneumo.training.checkpoint import load_checkpoint
from pneumo.training.classify import ClassifyConfig, train_classify
from pneumo.training.model import predict_proba

N_BINS = 15


def hand_logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)  # the documented clip
    return np.log(p / (1 - p))


def hand_bins(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Counts per right-closed bin ((m-1)/15, m/15] and the count-weighted ECE, by ceil."""
    index = np.clip(np.ceil(np.asarray(p, np.float64) * N_BINS).astype(int) - 1, 0, N_BINS - 1)
    counts = np.zeros(N_BINS, int)
    total = 0.0
    for b in range(N_BINS):
        inside = index == b
        counts[b] = inside.sum()
        if counts[b]:
            total += counts[b] * abs(y[inside].mean() - p[inside].mean())
    return counts, total / len(p)


def copy_run(run: str, dest: Path) -> str:
    shutil.copytree(run, dest)
    return str(dest)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def seg(trained_run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the trained run, scored plainly on val, then on test with ``calibrate``;
    ``fitted`` holds the logits and labels the temperature fit was given."""
    run = copy_run(trained_run.run, tmp_path_factory.mktemp("calibrate") / "run")
    evaluate_segment(EvaluateConfig(run=run, split="val", workers=0))
    fitted: list[tuple[np.ndarray, np.ndarray]] = []
    real = calibration.fit_and_store

    def spy(run: str, logits: np.ndarray, labels: np.ndarray, **kwargs: Any) -> dict:
        fitted.append((np.array(logits), np.array(labels)))
        return real(run, logits, labels, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pneumo.evaluation.evaluate.fit_and_store", spy)
        cfg = EvaluateConfig(run=run, split="test", workers=0, calibrate=True)
        summary = evaluate_segment(cfg)
    return {"run": Path(run), "summary": summary, "fitted": fitted}


def max_probs(run: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(run / "eval" / f"{split}.parquet")
    return table["max_prob"].to_numpy().astype(np.float64), np.array(
        table["has_ptx"].to_pylist(), bool
    )


def test_segment_temperature_is_fitted_on_val_rows_only(seg: dict[str, Any]) -> None:
    run = seg["run"]
    record = read_json(run / "calibration.json")
    p_val, y_val = max_probs(run, "val")
    p_test, y_test = max_probs(run, "test")
    assert record["fitted_on"]["split"] == "val"
    assert record["fitted_on"]["n_images"] == len(p_val) > 10
    assert record["step"] == load_checkpoint(str(run), "best")["step"]
    # The fit was given the val images' max probabilities (as logits) and labels, and
    # none of the test images'. (This weak fixture model's max probability carries no
    # signal, so its temperature sits at the upper bound on either split: comparing the
    # rows is the check that can tell them apart; the classify test below compares T.)
    [(logits, labels)] = seg["fitted"]
    order = np.argsort(logits, kind="stable")
    val_order = np.argsort(hand_logit(p_val), kind="stable")
    assert logits[order] == pytest.approx(hand_logit(p_val)[val_order], abs=1e-9)
    assert labels[order].tolist() == y_val[val_order].astype(int).tolist()
    assert not np.isin(np.round(hand_logit(p_test), 9), np.round(logits, 9)).any()
    t = record["temperature"]
    assert t == pytest.approx(fit_temperature(hand_logit(p_val), y_val), rel=1e-5)
    # NLL on val does not get worse under the fitted temperature (it is its minimum).
    assert record["val_nll_calibrated"] <= record["val_nll"] + 1e-12


def test_segment_reports_ece_before_and_after_with_its_bins(seg: dict[str, Any]) -> None:
    run, summary = seg["run"], seg["summary"]
    t = read_json(run / "calibration.json")["temperature"]
    p, y = max_probs(run, "test")
    counts, ece = hand_bins(p, y)
    calibrated = 1 / (1 + np.exp(-hand_logit(p) / t))
    counts_after, ece_after = hand_bins(calibrated, y)
    assert summary["ece"] == pytest.approx(ece, abs=1e-9)
    assert summary["ece_calibrated"] == pytest.approx(ece_after, abs=1e-9)
    assert summary["ece"] != pytest.approx(summary["ece_calibrated"], abs=1e-6)
    assert summary["temperature"] == t and summary["calibration_split"] == "val"
    stored = read_json(run / "eval" / "test.json")
    assert stored["ece"] == summary["ece"]
    bins = stored["reliability"]
    assert bins["before"]["count"] == counts.tolist()
    assert bins["after"]["count"] == counts_after.tolist()
    assert bins["before"]["edges"] == pytest.approx(np.arange(16) / 15)
    full = counts > 0
    expected_freq = [
        y[np.clip(np.ceil(p * 15) - 1, 0, 14) == b].mean() for b in np.flatnonzero(full)
    ]
    assert [f for f in bins["before"]["frequency"] if f is not None] == pytest.approx(expected_freq)
    png = run / "eval" / "test-reliability.png"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 300


def test_a_stored_temperature_is_used_only_for_its_checkpoint(seg: dict[str, Any]) -> None:
    run, first = seg["run"], seg["summary"]
    again = evaluate_segment(EvaluateConfig(run=str(run), split="test", workers=0))
    assert again["ece"] == first["ece"]
    assert again["ece_calibrated"] == pytest.approx(first["ece_calibrated"], abs=1e-12)
    record = read_json(run / "calibration.json")
    step, tta = record["step"], record["tta"]
    assert load_temperature(str(run), {"step": step, "tta": tta}) == record
    assert load_temperature(str(run), {"step": step + 1, "tta": tta}) is None
    assert load_temperature(str(run), {"step": step, "tta": not tta}) is None


def test_classify_temperature_is_fitted_on_val_and_reported(nih_demo: str, tmp_path: Path) -> None:
    # One small step: these block images are easy, and a few more steps classify every val
    # image right, which leaves no temperature to fit (see the test below).
    cfg = ClassifyConfig(
        dataset=nih_demo, out=str(tmp_path / "run"), size=64, batch_size=8, epochs=1,
        steps_per_epoch=1, workers=0, arch="resnet18", optimizer="adam", lr=1e-4,
    )  # fmt: skip
    train_classify(cfg)
    evaluate_classify(EvaluateClassifyConfig(run=cfg.out, split="val", workers=0))
    summary = evaluate_classify(
        EvaluateClassifyConfig(run=cfg.out, split="test", workers=0, calibrate=True)
    )
    run = Path(cfg.out)
    record = read_json(run / "calibration.json")
    assert record["fitted_on"]["split"] == "val" and record["fitted_on"]["n_images"] == 32

    def log_probs(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = pq.read_table(run / "eval" / f"{split}.parquet")
        probs = np.array(table["probs"].to_pylist(), np.float64)
        return np.log(probs), np.array(table["label"].to_pylist()), probs

    # softmax(log p / T) = softmax(z / T): the stored probabilities give back the logits
    # up to a constant per row (and float32 rounding)
    z_val, y_val, _ = log_probs("val")
    z_test, y_test, p_test = log_probs("test")
    t = record["temperature"]
    assert t == pytest.approx(fit_temperature(z_val, y_val), rel=1e-3)
    assert abs(fit_temperature(z_test, y_test) - t) > 0.02 * t
    _, ece = hand_bins(p_test[:, 1], y_test == 1)
    assert summary["ece"] == pytest.approx(ece, abs=1e-6)
    scaled = np.exp(z_test / t)
    _, ece_after = hand_bins(scaled[:, 1] / scaled.sum(axis=1), y_test == 1)
    assert summary["ece_calibrated"] == pytest.approx(ece_after, abs=1e-5)
    assert summary["temperature"] == t
    stored = read_json(run / "eval" / "test.json")
    assert sum(stored["reliability"]["after"]["count"]) == 32
    assert (run / "eval" / "test-reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_fit_on_val_images_all_classified_right_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"cannot fit a temperature on the val rows .*classified right"
    ):
        fit_and_store(
            str(tmp_path / "run"),
            np.array([[3.0, -1.0], [-2.0, 2.0]]),
            np.array([0, 1]),
            probabilities=lambda z, t: (np.zeros(2), np.zeros(2, bool)),
            fitted_on={"where": "split == 'val'", "dataset": "d"},
            model={"checkpoint": "best", "step": 1},
        )
    assert not (tmp_path / "run" / "calibration.json").exists()


@pytest.fixture(scope="module")
def few_dicoms(trained_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("few")
    for path in sorted(trained_run.dicoms.rglob("*.dcm"))[:4]:
        shutil.copy(path, folder / path.name)
    return folder


def read_details(path: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert list(rows[0]) == ["ImageId", "probability", "calibrated_probability", "uncertainty"]
    return rows


def test_predict_applies_the_stored_temperature(
    trained_run, few_dicoms: Path, tmp_path: Path
) -> None:
    run = copy_run(trained_run.run, tmp_path / "run")
    plain = predict(PredictConfig(run=run, input=str(few_dicoms), out_csv=str(tmp_path / "a.csv")))
    assert plain["temperature"] is None and plain["details_csv"] == str(tmp_path / "a.details.csv")
    assert all(r["calibrated_probability"] == "" for r in read_details(tmp_path / "a.details.csv"))

    predictor = Predictor.load(run)
    record = {"temperature": 2.5, "fitted_on": {"split": "val"}, "checkpoint": "best",
              "step": predictor.checkpoint["step"], "tta": predictor.tta}  # fmt: skip
    (Path(run) / "calibration.json").write_text(json.dumps(record))
    summary = predict(
        PredictConfig(run=run, input=str(few_dicoms), out_csv=str(tmp_path / "b.csv"))
    )
    assert summary["temperature"] == 2.5
    rows = read_details(tmp_path / "b.details.csv")
    assert len(rows) == 4
    p = np.array([float(r["probability"]) for r in rows])
    calibrated = np.array([float(r["calibrated_probability"]) for r in rows])
    assert calibrated == pytest.approx(1 / (1 + np.exp(-np.log(p / (1 - p)) / 2.5)), abs=2e-6)
    assert np.abs(calibrated - p).max() > 0.01  # T = 2.5 moved them
    # Calibration changes no mask: the submission is byte for byte the same, and stays
    # exactly ImageId,EncodedPixels.
    submission = (tmp_path / "b.csv").read_bytes()
    assert submission == (tmp_path / "a.csv").read_bytes()
    assert submission.decode().splitlines()[0] == "ImageId,EncodedPixels"

    (Path(run) / "calibration.json").write_text(json.dumps({**record, "tta": not predictor.tta}))
    other = predict(PredictConfig(run=run, input=str(few_dicoms), out_csv=str(tmp_path / "c.csv")))
    assert other["temperature"] is None  # fitted for the other TTA setting: not applied


class Conv(torch.nn.Module):
    """One 3x3 convolution, zero padded: flip-equivariant iff its kernel is left-right
    symmetric."""

    def __init__(self, kernel: list[list[float]]) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


SYMMETRIC = [[1.0, 2.0, 1.0], [0.0, -3.0, 0.0], [1.0, 2.0, 1.0]]
LOPSIDED = [[0.0, 0.0, 2.0], [0.0, 1.0, 2.0], [-1.0, 0.0, 2.0]]


@pytest.mark.parametrize("tta", [False, True])
def test_flip_uncertainty_is_zero_only_for_an_equivariant_model(tta: bool) -> None:
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for kernel, equivariant in ((SYMMETRIC, True), (LOPSIDED, False)):
        model = Conv(kernel).eval()
        stub = SimpleNamespace(model=model, device=torch.device("cpu"), amp=False, tta=tta)
        probs, uncertainty = flip_probabilities(stub, images)
        with torch.no_grad():
            assert torch.allclose(probs, predict_proba(model, images, tta=tta)[:, 0])
            plain = torch.sigmoid(model(images))[:, 0].numpy()
            mirror = torch.sigmoid(model(images.flip(-1))).flip(-1)[:, 0].numpy()
        expected = np.abs(plain - mirror).reshape(3, -1).mean(axis=1)
        assert uncertainty == pytest.approx(expected, abs=1e-7)
        if equivariant:
            assert np.abs(uncertainty).max() < 1e-6
        else:
            assert (uncertainty > 0.01).all()


def test_predict_writes_the_uncertainty_column(
    trained_run, few_dicoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    predict(
        PredictConfig(run=trained_run.run, input=str(few_dicoms), out_csv=str(tmp_path / "r.csv"))
    )
    real = [float(r["uncertainty"]) for r in read_details(tmp_path / "r.details.csv")]
    assert all(0 < u < 1 for u in real), real  # a trained U-Net is not flip-equivariant

    load = Predictor.load

    def symmetric(*args: Any, **kwargs: Any) -> Predictor:
        predictor = load(*args, **kwargs)
        predictor.model = Conv(SYMMETRIC).eval()
        return predictor

    monkeypatch.setattr("pneumo.evaluation.predict.Predictor.load", symmetric)
    predict(
        PredictConfig(run=trained_run.run, input=str(few_dicoms), out_csv=str(tmp_path / "s.csv"))
    )
    assert [float(r["uncertainty"]) for r in read_details(tmp_path / "s.details.csv")] == [0.0] * 4


def test_cli_evaluate_segment_calibrate(trained_run, tmp_path: Path, pneumo) -> None:
    run = copy_run(trained_run.run, tmp_path / "run")
    proc = pneumo("evaluate", "segment", run, "--calibrate", "--workers", "0")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("calibration: ECE"))
    t = read_json(Path(run) / "calibration.json")["temperature"]
    assert f"after temperature {t:.4f} (fitted on val)" in line
    assert (Path(run) / "eval" / "test-reliability.png").exists()
