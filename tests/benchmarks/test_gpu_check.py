"""benchmarks/gpu_check.py on the CPU: the --smoke run end to end, the batch search's
out-of-memory stop, and the GPU busy sampler's nvidia-smi path."""

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

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_measures_every_phase_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["settings"]["smoke"] and results["settings"]["size"] == 64
    search = results["segment_synthetic"]
    assert search["largest_batch"] == 2 and search["by_batch"]["2"]["steps"] == 2
    phases = ["segment_stream_batch2", "classifier", "autoencoder", "embedding"]
    for name in phases:
        assert results[name]["images_per_s"] > 0, (name, results[name])
        assert results[name]["steps"] == 2
    for name in phases[1:]:  # the other engineers' tasks are stood in for, and say so
        assert "stand-in" in results[name]["note"]
    assert "segment stream batch2" in done.stdout  # the table


def test_the_batch_search_stops_at_the_first_out_of_memory(monkeypatch) -> None:
    gpu_check = _module()
    tried = []

    def fake_rate(kind, batch, args, device):
        tried.append(batch)
        if batch >= 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"images_per_s": float(batch)}

    monkeypatch.setattr(gpu_check, "synthetic_rate", fake_rate)
    args = SimpleNamespace(max_batch=512, budget_s=600, out=os.devnull, size=64,
                           seconds=0, workers=1, smoke=True)  # fmt: skip
    run = gpu_check.Run(args, torch.device("cpu"))
    result = gpu_check.batch_search(run, "unet")
    assert tried == [8, 16, 32, 64]
    assert result["largest_batch"] == 32 and result["by_batch"]["64"] == "out of memory"
    # a phase that runs out of memory is recorded, and the run goes on
    oom = run.phase("x", lambda: fake_rate("unet", 128, args, None))
    assert oom == {"error": "out of GPU memory"}


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
    assert busy.mean == 87.0
    assert gpu_check.BusySampler(torch.device("cpu")).source is None
