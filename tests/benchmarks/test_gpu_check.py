"""benchmarks/gpu_check.py on the CPU: the --cpu-smoke run goes through the project's real
entry points (the training loop, embed) and writes its figures; the timing leaves the
warm-up out; the batch search stops at the first out-of-memory; the busy-share sources."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pneumo.pseudolabels.embed as embed_module
from pneumo.training import loop

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def threads():
    """main() sets one CPU thread for the smoke run: give the rest of the session its own."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.mark.slow
def test_cpu_smoke_runs_every_task_through_its_real_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, threads
) -> None:
    trained, embedded = [], []
    real_run, real_embed_rank = loop.run, embed_module._embed_rank

    def spy_run(task, progress=None):
        trained.append((task.name, task.cfg))
        return real_run(task, progress)

    def spy_embed_rank(cfg, *args):
        embedded.append(cfg)
        return real_embed_rank(cfg, *args)

    monkeypatch.setattr(loop, "run", spy_run)
    monkeypatch.setattr(embed_module, "_embed_rank", spy_embed_rank)
    out = tmp_path / "gpu.json"
    results = _module().main(["--cpu-smoke", "--json", str(out)])

    assert json.loads(out.read_text()) == results
    assert results["settings"]["cpu_smoke"] and results["settings"]["size"] == 64
    # The loop itself trained each task, in each precision, at the smoke settings.
    tasks = ["segment", "classify", "autoencode"]
    assert [(name, cfg.precision) for name, cfg in trained] == [
        *((t, "bf16") for t in tasks),
        *((t, "fp16") for t in tasks),
    ]
    for _, cfg in trained:
        assert (cfg.size, cfg.batch_size, cfg.steps_per_epoch, cfg.compile) == (64, 2, 2, False)
    # embed ran in each precision asked for, with the autoencoder the smoke run trained.
    assert [cfg.precision for cfg in embedded] == ["bf16", "fp16"]
    assert all(cfg.run.endswith("autoencode-bf16-b2") for cfg in embedded)

    runs = {(r["task"], r["precision"], r["batch"]): r for r in results["runs"]}
    for task in ("segment", "classify", "autoencode", "embed"):
        row = runs[task, "bf16", 2]
        assert row["images_per_s"] > 0 and row["timed_steps"] >= 1, row
        assert results["largest_batch"][task] == {"precision": "bf16", "batch": 2}
    for task in tasks:
        for precision in ("bf16", "fp16"):
            row = runs[task, precision, 2]
            assert row["entry_point"] == {"task": task, "step": 2, "total_steps": 2}, row
            assert row["images_per_s"] > 0 and row["timed_steps"] == 1, row
    assert runs["embed", "fp16", 2]["entry_point"] == {"rows": 24, "precision": "fp16"}
    assert runs["embed", "bf16", 2]["timed_steps"] == 11  # 24 rows in 12 batches, 1 warm-up
    table = capsys.readouterr().out
    assert "images/s" in table and "largest batch that fits, segment (bf16): 2" in table


def test_without_cuda_the_script_refuses_unless_smoke(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    assert "no CUDA device: run with --cpu-smoke" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_the_timing_leaves_out_the_warm_up_and_the_reports_that_did_not_wait(
    monkeypatch,
) -> None:
    """Only the loop's loss readings wait for the device (every log_every steps, and the
    last): timing runs from the first reading after the warm-up to the last reading."""
    gpu_check = _module()
    clock = iter([10.0, 20.0, 24.0, 26.0, 100.0, 101.0, 102.0, 103.0])  # at readings only
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: next(clock))
    meter = gpu_check.Meter(torch.device("cpu"), warmup=2, batch=4)
    for step in range(1, 6):  # steps 1-2 warm up (start-up, cuDNN autotune) until t = 20
        reading = {} if step == 3 else {"loss": 0.5}  # step 3's report did not wait
        meter({"event": "step", "step": step, "total": 5, **reading})
    meter({"event": "epoch", "epochs": 1})
    figures = meter.figures()
    # From the reading at step 2 (t = 20) to the last at step 5 (t = 26): 3 x 4 images in 6 s.
    assert figures["images_per_s"] == pytest.approx(12 / 6)
    assert figures["timed_steps"] == 3
    # embed's reports count images (a partial last batch counts what it holds).
    meter = gpu_check.Meter(torch.device("cpu"), warmup=2, batch=4)
    for done in (4, 8, 12, 14):
        meter({"done": done, "total": 14})
    assert meter.figures()["images_per_s"] == pytest.approx(6 / 2)  # t = 101 -> 103


def test_precision_compile_and_timing_settings_reach_each_config(tmp_path: Path) -> None:
    """The compiled run is GPU-only (not in --cpu-smoke): its config is checked here."""
    gpu_check = _module()
    args = gpu_check.parse(["--size", "128", "--warmup", "3", "--steps", "4", "--workers", "1"])
    ctx = {"dataset": str(tmp_path), "ae_run": str(tmp_path / "ae")}
    for task in ("segment", "classify", "autoencode"):
        cfg = gpu_check.task_config(task, args, ctx, str(tmp_path / task), 16, "fp16", True)
        assert (cfg.precision, cfg.compile, cfg.batch_size, cfg.size) == ("fp16", True, 16, 128)
        assert (cfg.steps_per_epoch, cfg.log_every, cfg.workers) == (7, 3, 1)
    cfg = gpu_check.task_config("embed", args, ctx, str(tmp_path / "e"), 32, "bf16")
    assert (cfg.precision, cfg.batch_size, cfg.run) == ("bf16", 32, ctx["ae_run"])


def test_the_batch_search_stops_at_the_first_out_of_memory(monkeypatch, tmp_path: Path) -> None:
    gpu_check = _module()
    tried = []

    def fake_measure(run, task, batch, precision, compiled=False):
        tried.append(batch)
        if batch >= 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"images_per_s": float(batch)}

    monkeypatch.setattr(gpu_check, "measure", fake_measure)
    args = SimpleNamespace(
        max_batch=512, budget_s=600, json=os.devnull, size=64, batch=8, warmup=1, steps=1,
        workers=0, cpu_smoke=True, precisions=["bf16"],
    )  # fmt: skip
    run = gpu_check.Run(args, torch.device("cpu"), tmp_path)
    first = run.one("segment", 8, "bf16")
    assert gpu_check.batch_search(run, "segment", "bf16", first) == 32
    assert tried == [8, 16, 32, 64]
    # the run that did not fit is recorded, and the next measurement goes on
    assert run.results["runs"][-1] == {
        "task": "segment", "precision": "bf16", "batch": 64, "compile": False,
        "error": "out of memory",
    }  # fmt: skip
    assert run.one("classify", 8, "bf16")["images_per_s"] == 8.0


def test_busy_share_comes_from_nvidia_smi_without_pynvml(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 87\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpu_check = _module()
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: 1 / 0)  # no pynvml
    with gpu_check.BusySampler(torch.device("cuda", 0), period=0.01) as busy:
        deadline = time.monotonic() + 20
        while len(busy.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert busy.mean == 87.0 and busy.kind == "nvidia-smi"
    assert gpu_check.BusySampler(torch.device("cpu")).source is None


def test_busy_share_polls_the_stream_without_pynvml_or_nvidia_smi(monkeypatch) -> None:
    gpu_check = _module()
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: 1 / 0)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    pending = iter([False, False, False, True])  # query(): True once the stream is idle
    stream = SimpleNamespace(query=lambda: next(pending))
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: stream)
    kind, source = gpu_check._busy_source(torch.device("cuda", 0))
    assert kind == "stream-poll"
    assert [source() for _ in range(4)] == [100.0, 100.0, 100.0, 0.0]


def test_the_compiled_segment_run_is_compared_with_the_eager_one(monkeypatch, tmp_path) -> None:
    gpu_check = _module()
    asked = []

    def fake_measure(run, task, batch, precision, compiled=False):
        asked.append((task, batch, precision, compiled))
        return {"images_per_s": 30.0 if compiled else 20.0}

    monkeypatch.setattr(gpu_check, "measure", fake_measure)
    args = gpu_check.parse(["--json", os.devnull])
    run = gpu_check.Run(args, torch.device("cpu"), tmp_path)
    eager = run.one("segment", 8, "bf16")
    gpu_check.compare_compiled(run, eager)
    assert asked == [("segment", 8, "bf16", False), ("segment", 8, "bf16", True)]
    assert run.results["compile"]["segment"] == {
        "eager_images_per_s": 20.0, "compiled_images_per_s": 30.0, "speedup": 1.5
    }  # fmt: skip
