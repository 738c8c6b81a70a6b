"""MLflow tracking: a tiny classify training, its resume and its evaluation logged to a
sqlite store, read back with MLflow's own client and compared with the RUN's files; the
experiment's stages nested under one run, also from another process; without tracking,
mlflow is never imported."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from pneumo.experiment.stages import Stage, StageContext, StageRunner, execute_stage
from pneumo.shards.layout import MANIFEST_DIR
from pneumo.training import tracked, tracking
from pneumo.training.runs import DistEnv

pytestmark = pytest.mark.slow


class Crash(Exception):
    """Stands for a kill in the middle of a training."""


def small(dataset: str, out: Path | str, **changes: Any) -> Any:
    """Seconds on CPU: ResNet-18 at 64 px, 2 epochs of 2 steps of 8."""
    from pneumo.training.classify import ClassifyConfig

    base: dict[str, Any] = dict(
        dataset=dataset, out=str(out), size=64, batch_size=8, epochs=2, steps_per_epoch=2,
        workers=0, arch="resnet18", optimizer="adam", lr=1e-3, checkpoint_every=2,
    )  # fmt: skip
    return ClassifyConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tracking.TrackingConfig:
    """One sqlite store for the module (creating its tables takes seconds)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return tracking.TrackingConfig(uri=f"sqlite:///{db}", experiment="tests")


def client(cfg: tracking.TrackingConfig) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.uri)


def run_id_of(folder: str | Path) -> str:
    return str(json.loads((Path(folder) / tracking.RECORD_FILE).read_text())["run_id"])


def artifacts(mlflow: Any, run_id: str, path: str | None = None) -> set[str]:
    return {f.path for f in mlflow.list_artifacts(run_id, path)}


@pytest.fixture(scope="module")
def trained(nih_demo: str, store: tracking.TrackingConfig, tmp_path_factory) -> dict[str, Any]:
    """A tracked training that crashed at step 3 (last.pt: step 2) and was resumed."""
    from pneumo.training.classify import train_classify

    cfg = small(nih_demo, tmp_path_factory.mktemp("tracked") / "run")

    def crash(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 3:
            raise Crash

    with tracking.activated(store):
        with pytest.raises(Crash):
            train_classify(cfg, progress=crash)
        after_crash = client(store).get_run(run_id_of(cfg.out)).info.status
        first_id = run_id_of(cfg.out)
        result = train_classify(cfg)
    return {"cfg": cfg, "result": result, "after_crash": after_crash, "first_id": first_id}


def test_a_training_is_a_run_with_its_config_metrics_identity_and_files(
    trained: dict[str, Any], store: tracking.TrackingConfig
) -> None:
    from deltalake import DeltaTable

    cfg, mlflow = trained["cfg"], client(store)
    run = mlflow.get_run(run_id_of(cfg.out))
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params, tags = run.data.params, run.data.tags
    assert (params["lr"], params["batch_size"], params["size"]) == ("0.001", "8", "64")
    assert (params["arch"], params["optimizer"], params["epochs"]) == ("resnet18", "adam", "2")
    assert params["dataset"] == cfg.dataset and params["model_args.backbone"] == "resnet18"
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    assert tags["pneumo.fingerprint.train"] == config["fingerprints"]["train"]
    assert tags["pneumo.fingerprint.val"] == config["fingerprints"]["val"]
    version = DeltaTable(str(Path(cfg.dataset) / MANIFEST_DIR)).version()
    assert tags["pneumo.dataset_version"] == str(version)
    assert tags["pneumo.task"] == "classify" and tags["pneumo.init"] == "random init (seed 0)"
    # Every number of metrics.jsonl, under its own name, at step = epoch.
    lines = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    names = {k for r in lines for k, v in r.items() if isinstance(v, int | float)}
    assert {"val_auroc", "val_loss", "train_loss", "lr", "val_accuracy"} <= names
    for name in names:
        logged = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, name)}
        assert logged == pytest.approx({r["epoch"]: r[name] for r in lines}), name
    assert run.data.metrics["best_val_auroc"] == pytest.approx(trained["result"]["best_score"])
    assert {"curves.png", "config.json", "metrics.jsonl"} <= artifacts(mlflow, run.info.run_id)


def test_a_resumed_training_continues_its_run(
    trained: dict[str, Any], store: tracking.TrackingConfig
) -> None:
    cfg, mlflow = trained["cfg"], client(store)
    assert trained["after_crash"] == "FAILED"
    assert run_id_of(cfg.out) == trained["first_id"]
    experiment = mlflow.get_experiment_by_name(store.experiment)
    named = mlflow.search_runs([experiment.experiment_id], "attributes.run_name = 'run'")
    assert [r.info.run_id for r in named] == [trained["first_id"]]  # no second run
    steps = [m.step for m in mlflow.get_metric_history(trained["first_id"], "val_loss")]
    assert sorted(steps) == [0, 1]  # epoch 0 from the first attempt, epoch 1 after resuming


def test_an_evaluation_is_a_run_linked_to_its_training(
    trained: dict[str, Any], store: tracking.TrackingConfig
) -> None:
    from pneumo.evaluation.classify import EvaluateClassifyConfig, evaluate_classify

    cfg, mlflow = trained["cfg"], client(store)
    with tracking.activated(store):
        summary = evaluate_classify(EvaluateClassifyConfig(run=cfg.out, split="test", workers=0))
    experiment = mlflow.get_experiment_by_name(store.experiment)
    (run,) = mlflow.search_runs([experiment.experiment_id], "tags.`pneumo.kind` = 'evaluation'")
    assert run.data.tags["pneumo.trained_run_id"] == run_id_of(cfg.out)
    assert run.data.params["split"] == "test" and run.data.params["checkpoint"] == "best"
    assert run.data.metrics["auroc"] == pytest.approx(summary["auroc"])
    assert run.data.metrics["n_images"] == summary["n_images"] == 32
    assert {"eval/test.json", "eval/test-roc.png"} <= artifacts(mlflow, run.info.run_id, "eval")
    assert len(run.data.tags["pneumo.fingerprint.eval"]) == 16


# ---------------------------------------------------------------- stages


def add(ctx: StageContext) -> dict[str, Any]:
    """A trivial stage: its value plus its inputs' totals."""
    total = ctx.stage.settings["value"] + sum(r["total"] for r in ctx.inputs.values())
    return {"total": total, "pid": os.getpid()}


def test_stages_are_runs_nested_under_the_experiment_also_in_another_process(
    store: tracking.TrackingConfig, tmp_path: Path
) -> None:
    a = Stage(kind="add", label="stage a", settings={"value": 1})
    b = Stage(kind="add", label="stage b", settings={"value": 10}, inputs=(("in", a),))
    exp = str(tmp_path / "exp")
    with tracking.activated(replace(store, experiment="nesting")):
        with tracking.open_run(name="exp") as parent, tracking.parent(parent):
            runner = StageRunner(exp=exp, dataset="unused", functions={"add": add})
            runner.run(a)
            job = runner.job(b)  # planned here, run in a fresh (spawned) process
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                outcome = pool.apply(execute_stage, (job,))
            runner.finish(job, outcome)
    assert outcome.record["result"]["pid"] != os.getpid()
    mlflow = client(store)
    for stage, total in ((a, 1), (b, 11)):
        run = mlflow.get_run(run_id_of(Path(exp) / stage.path))
        assert run.data.tags["mlflow.parentRunId"] == parent.id, stage.label
        assert run.info.run_name == stage.label and run.info.status == "FINISHED"
        assert run.data.params["stage.settings.value"] == str(stage.settings["value"])
        assert run.data.metrics["total"] == total


def test_only_rank_0_logs(store: tracking.TrackingConfig) -> None:
    job = SimpleNamespace(env=DistEnv(rank=1, world_size=2))
    with tracking.activated(store):
        assert tracked.training_run(job).run is tracking.NOT_TRACKED  # type: ignore[arg-type]


# ---------------------------------------------------------------- failures, secrets, off


def test_a_tracking_server_down_warns_once_without_the_password_and_training_goes_on(
    nih_demo: str, tmp_path: Path, free_port: int, caplog, monkeypatch
) -> None:
    from pneumo.training.classify import train_classify

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = tracking.TrackingConfig(uri=f"http://alice:s3cr3t@127.0.0.1:{free_port}")
    assert "s3cr3t" not in repr(down)
    cfg = small(nih_demo, tmp_path / "run", epochs=1, steps_per_epoch=1)
    with caplog.at_level(logging.WARNING), tracking.activated(down):
        result = train_classify(cfg)
    assert result["step"] == 1
    warned = [r.getMessage() for r in caplog.records if r.name == tracking.__name__]
    assert len(warned) == 1 and f"127.0.0.1:{free_port}" in warned[0], warned
    assert "s3cr3t" not in caplog.text
    assert not (tmp_path / "run" / tracking.RECORD_FILE).exists()
    # Later runs of this process do not wait for the server again.
    tried: list[Any] = []

    def open_again(*args: Any) -> None:
        tried.append(args)
        raise RuntimeError("still down")

    monkeypatch.setattr(tracking, "_open", open_again)
    with tracking.activated(down):
        assert tracking.open_run(name="later") is tracking.NOT_TRACKED and not tried


def test_a_store_failing_mid_run_warns_once_and_training_goes_on(
    nih_demo: str, store: tracking.TrackingConfig, tmp_path: Path, caplog, monkeypatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pneumo.training.classify import train_classify

    def down(*args: Any, **kwargs: Any) -> None:
        raise MlflowException("connection refused")

    monkeypatch.setattr(MlflowClient, "log_batch", down)  # the run opens, then every write fails
    monkeypatch.setattr(tracking, "_warned", set())
    with caplog.at_level(logging.WARNING), tracking.activated(store):
        result = train_classify(small(nih_demo, tmp_path / "failing", epochs=1, steps_per_epoch=1))
    assert result["step"] == 1
    warned = [r.getMessage() for r in caplog.records if r.name == tracking.__name__]
    assert len(warned) == 1 and "connection refused" in warned[0], warned
    assert (tmp_path / "failing" / tracking.RECORD_FILE).exists()  # the run was opened


def test_tracking_asked_without_mlflow_is_one_line_saying_what_to_install(
    monkeypatch, tmp_path: Path
) -> None:
    from pneumo.cli import app

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    result = CliRunner().invoke(app, ["train", "segment", str(tmp_path), "--out", "r"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: tracking needs MLflow, which is not installed: pip install 'pneumo[tracking]'"
    )


def test_without_tracking_mlflow_is_not_imported(nih_demo: str, tmp_path: Path) -> None:
    """A real `pneumo train classify` (and its evaluation) in a fresh interpreter."""
    script = f"""
import sys
from typer.testing import CliRunner
from pneumo.cli import app
args = ["train", "classify", {nih_demo!r}, "--out", {str(tmp_path / "run")!r}, "--size", "64",
        "--batch-size", "8", "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0",
        "--arch", "resnet18"]
result = CliRunner().invoke(app, args)
assert result.exit_code == 0, result.output
result = CliRunner().invoke(app, ["evaluate", "classify", {str(tmp_path / "run")!r},
                                  "--workers", "0", "--batch-size", "32"])
assert result.exit_code == 0, result.output
print("mlflow" in sys.modules, any(m.startswith("mlflow") for m in sys.modules))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False"]
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / tracking.RECORD_FILE).exists()
