"""``precision`` (bf16 | fp16 | fp32) and ``compile``: the autocast dtype and gradient scaler
each device and precision get, the fp16 scaler's state through a checkpoint and a resume,
configs and checkpoints from before ``precision`` (``amp``), and compiled training whose
checkpoints hold the plain module's keys.

No GPU here: CPU autocast supports float16 in this torch, so the fp16 path (autocast and an
enabled GradScaler) runs on CPU with :func:`pneumo.training.runs.amp_dtype` told to treat
the CPU as it treats a GPU. The product itself runs everything on CPU in float32.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_log_every import TinyTask, tiny
from torch import nn
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.shards.errors import ConfigError
from pneumo.training import checkpoint as ckpts
from pneumo.training import loop, runs, segment
from pneumo.training.job import Job
from pneumo.training.runs import amp_dtype, autocast, grad_scaler, unwrapped

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)

# ---------------------------------------------------------------- what each setting gets


def test_the_autocast_dtype_of_each_device_and_precision() -> None:
    assert [amp_dtype(CUDA, p) for p in ("bf16", "fp16", "fp32")] == [
        torch.bfloat16, torch.float16, None
    ]  # fmt: skip
    assert [amp_dtype(CPU, p) for p in ("bf16", "fp16", "fp32")] == [None, None, None]
    assert (amp_dtype(CUDA, True), amp_dtype(CUDA, False)) == (torch.bfloat16, None)  # amp
    with pytest.raises(ConfigError, match="--precision 'fp8'"):
        amp_dtype(CUDA, "fp8")
    assert isinstance(autocast(CPU, "fp16"), type(autocast(CPU, "fp32")))  # nothing on CPU


def test_only_fp16_on_a_gpu_scales_the_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if CUDA were there (a GradScaler for "cuda" disables itself without it).
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    enabled = {(d.type, p): grad_scaler(d, p).is_enabled() for d in (CPU, CUDA)
               for p in ("bf16", "fp16", "fp32")}  # fmt: skip
    assert [k for k, on in enabled.items() if on] == [("cuda", "fp16")]


def test_precision_and_the_legacy_amp_setting() -> None:
    base = tiny("/data", "/run")
    assert (base.precision, base.amp, base.compile) == ("bf16", True, False)
    assert (replace(base, precision="fp32").precision, replace(base, precision="fp32").amp) == (
        "fp32", False
    )  # fmt: skip
    assert tiny("/data", "/run", amp=False).precision == "fp32"  # a config from before
    fp32 = tiny("/data", "/run", precision="fp32")
    assert replace(fp32, precision="fp16").amp  # precision wins over the stale amp
    assert fp32.to_dict()["amp"] is False  # what older readers of config.json use
    with pytest.raises(ConfigError, match="--precision 'half'"):
        tiny("/data", "/run", precision="half")


def test_precision_and_compile_reach_the_config_from_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(segment, "train_segment", lambda cfg, progress=None: seen.append(cfg))
    args = ["train", "segment", str(tmp_path), "--out", str(tmp_path / "run")]
    CliRunner().invoke(app, [*args, "--precision", "fp16", "--compile"])
    CliRunner().invoke(app, args)
    assert [(c.precision, c.compile) for c in seen] == [("fp16", True), ("bf16", False)]
    refused = CliRunner().invoke(app, [*args, "--precision", "fp64"])
    assert refused.exit_code == 1 and "--precision 'fp64'" in refused.output
    for command in ("segment", "classify", "autoencode"):
        shown = " ".join(CliRunner().invoke(app, ["train", command, "--help"]).output.split())
        assert "--precision" in shown and "--compile" in shown, command


# ---------------------------------------------------------------- fp16 through a resume


@pytest.fixture
def fp16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU treated as a GPU is: fp16 autocast and an enabled GradScaler("cpu")."""
    choose = runs.amp_dtype

    def as_on_a_gpu(device: torch.device, precision: str | bool) -> torch.dtype | None:
        return choose(torch.device("cuda"), precision)

    monkeypatch.setattr(runs, "amp_dtype", as_on_a_gpu)


def _scaler_states(monkeypatch: pytest.MonkeyPatch) -> dict[int, dict[str, Any]]:
    """The scaler's state after each step, by step (filled as runs go)."""
    states: dict[int, dict[str, Any]] = {}
    step = loop._train_step

    def recorded(job: Job, batch: dict[str, Any]) -> torch.Tensor:
        loss = step(job, batch)
        states[job.step + 1] = job.scaler.state_dict()
        return loss

    monkeypatch.setattr(loop, "_train_step", recorded)
    return states


def test_fp16_scales_the_loss_and_its_scaler_survives_a_resume(
    dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fp16_on_cpu: None
) -> None:
    """2 epochs of 3 steps in fp16: the steps run under fp16 autocast with an enabled
    scaler; every resumable checkpoint holds its state, and a run stopped after step 4
    resumes with it: the same scaler states and the same validation as the whole run."""
    dtypes: list[torch.dtype] = []
    loss = TinyTask.loss

    def recorded(self: TinyTask, job: Any, batch: dict[str, Any]) -> torch.Tensor:
        dtypes.append(job.net[0](torch.zeros(1, 1, 4, 4)).dtype)  # the conv, under autocast
        return loss(self, job, batch)

    monkeypatch.setattr(TinyTask, "loss", recorded)
    states = _scaler_states(monkeypatch)
    whole = tiny(dataset.url, tmp_path / "whole", epochs=2, steps_per_epoch=3, precision="fp16")
    loop.run(TinyTask(whole))
    assert set(dtypes) == {torch.float16}
    reference = dict(states)
    # Each step grows the scale's count, or backs the scale off after an overflow.
    assert len({str(reference[s]) for s in range(1, 7)}) == 6
    assert "scaler" not in ckpts.load_checkpoint(whole.out, "last")  # finished: weights only

    states.clear()
    cut = replace(whole, out=str(tmp_path / "cut"))

    def stop_after_4(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.run(TinyTask(cut), progress=stop_after_4)
    saved = ckpts.load_checkpoint(cut.out, "last")
    assert saved["step"] == 4 and saved["scaler"] == reference[4]
    states.clear()
    loop.run(TinyTask(cut))
    assert {s: states[s] for s in (5, 6)} == {s: reference[s] for s in (5, 6)}
    val = [ckpts.load_checkpoint(r.out, "last")["val"]["val_loss"] for r in (whole, cut)]
    assert val[0] == pytest.approx(val[1], rel=1e-6)


def _write_last(out: str, ckpt: dict[str, Any]) -> None:
    (Path(out) / ckpts.LAST).write_bytes(ckpts.to_bytes(ckpt))


def test_a_resume_keeps_the_precision_and_reads_old_amp_checkpoints(
    dataset, tmp_path: Path
) -> None:
    cfg = tiny(dataset.url, tmp_path / "run", epochs=2, steps_per_epoch=2, precision="fp32")

    def stop_after_1(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.run(TinyTask(cfg), progress=stop_after_1)
    with pytest.raises(ConfigError, match="--precision 'fp32' \\(now 'bf16'\\)") as err:
        loop.run(TinyTask(replace(cfg, precision="bf16")))
    assert "\n" not in str(err.value) and str(err.value).count("(now") == 1  # not --amp too
    # A checkpoint from before precision, compile and log_every: amp alone says fp32.
    ckpt = ckpts.load_checkpoint(cfg.out, "last")
    for key in ("precision", "compile", "log_every"):
        del ckpt["config"][key]
    assert ckpt["config"]["amp"] is False
    _write_last(cfg.out, ckpt)
    with pytest.raises(ConfigError, match="--precision 'fp32' \\(now 'bf16'\\)"):
        loop.run(TinyTask(replace(cfg, precision="bf16")))
    assert loop.run(TinyTask(replace(cfg, precision=None, amp=False)))["step"] == 4
    # An old run with amp on resumes under today's default, bf16.
    old = tiny(dataset.url, tmp_path / "old", epochs=2, steps_per_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        loop.run(TinyTask(old), progress=stop_after_1)
    ckpt = ckpts.load_checkpoint(old.out, "last")
    for key in ("precision", "compile", "log_every"):
        del ckpt["config"][key]
    _write_last(old.out, ckpt)
    assert loop.run(TinyTask(old))["step"] == 4


# ---------------------------------------------------------------- torch.compile


def test_checkpoint_keys_are_the_plain_module_s() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    compiled = torch.compile(model)  # nothing is compiled until it is called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrapped(compiled) is model and unwrapped(model) is model
    assert list(unwrapped(compiled).state_dict()) == ["0.weight", "0.bias", *[
        f"1.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ]]  # fmt: skip


@pytest.mark.slow
def test_a_compiled_run_trains_saves_plain_keys_and_resumes_either_way(
    dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile (inductor, on CPU: it needs a C compiler) of the step's module; its
    checkpoints load into the plain model; a resume may switch compile on or off."""
    nets: list[nn.Module] = []
    loss = TinyTask.loss

    def recorded(self: TinyTask, job: Any, batch: dict[str, Any]) -> torch.Tensor:
        nets.append(job.net)
        return loss(self, job, batch)

    monkeypatch.setattr(TinyTask, "loss", recorded)
    cfg = tiny(dataset.url, tmp_path / "run", epochs=2, steps_per_epoch=2, compile=True)

    def stop_after_3(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.run(TinyTask(cfg), progress=stop_after_3)
    assert len(nets) == 3 and all(hasattr(n, "_orig_mod") for n in nets)  # compiled steps
    for which in ("last", "best"):
        state = ckpts.load_checkpoint(cfg.out, which)["model"]
        assert not [k for k in state if "_orig_mod" in k]
        TinyTask(cfg).build_model().load_state_dict(state)  # strict: every key, no other
    nets.clear()
    assert loop.run(TinyTask(replace(cfg, compile=False)))["step"] == 4  # free on resume
    assert not hasattr(nets[0], "_orig_mod")
