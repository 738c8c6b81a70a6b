"""The β-VAE's KL annealing as documented: README and ``pneumo train autoencode --help`` say
the KL weight grows linearly from 0 to β over ``--kl-anneal-steps``, by default a quarter of
the run; ``AutoencodeConfig`` says 0 means no annealing. Expected weights are worked out
here as plain fractions (step / anneal steps, capped at 1).

tests/training/test_config_reaches_use.py checks one default schedule (200 steps) and an
explicit 40; here: the exact values around the end of the default ramp, an explicit count
longer than the run (not cut down to the run), an explicit 0 at every step, and the
weights the training loss is really given, step by step, in a real run and after a resume.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pneumo.training import autoencode
from pneumo.training.autoencode import AutoencodeConfig, AutoencodeTask, train_autoencode


def _task(**changes: Any) -> AutoencodeTask:
    base: dict[str, Any] = dict(
        dataset="/data", out="/run", kind="vae", size=64, latent_dim=4, batch_size=2, workers=0
    )
    return AutoencodeTask(AutoencodeConfig(**{**base, **changes}))


def _weights(task: AutoencodeTask, total: int, steps: list[int]) -> list[float]:
    return [task.kl_weight(SimpleNamespace(step=s, total=total)) for s in steps]


def test_the_default_anneals_over_a_quarter_of_the_run() -> None:
    task = _task()
    assert task.cfg.kl_anneal_steps is None
    steps = [0, 1, 25, 50, 75, 99, 100, 101, 250, 399]
    # 400 steps: the ramp is 100 steps long, the weight is step / 100 until it reaches 1.
    want = [0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0, 1.0, 1.0, 1.0]
    assert _weights(task, 400, steps) == pytest.approx(want, abs=1e-12)
    # Another length, another ramp: 1000 steps -> 250.
    assert _weights(task, 1000, [0, 125, 249, 250, 999]) == pytest.approx(
        [0.0, 0.5, 249 / 250, 1.0, 1.0], abs=1e-12
    )
    # Never above 1, never below 0, never falling, over the whole run.
    run = _weights(task, 400, list(range(400)))
    assert all(0.0 <= w <= 1.0 for w in run)
    assert all(a <= b for a, b in zip(run, run[1:], strict=False))


def test_a_quarter_is_whole_steps() -> None:
    """A run of 10 steps anneals over 10 // 4 = 2 of them; one shorter than 4 steps has a
    quarter of 0 steps: the full weight from the start (no division by zero)."""
    task = _task()
    assert _weights(task, 10, [0, 1, 2, 9]) == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert _weights(task, 3, [0, 1, 2]) == [1.0, 1.0, 1.0]


def test_an_explicit_zero_is_no_annealing_at_every_step_of_every_run() -> None:
    task = _task(kl_anneal_steps=0)
    for total in (1, 4, 400, 10_000):
        assert _weights(task, total, [0, 1, total // 4, total - 1]) == [1.0] * 4


def test_an_explicit_count_is_used_as_given_even_past_the_end_of_the_run() -> None:
    """--kl-anneal-steps 1000 on a 400-step run: the weight reaches only 0.399."""
    task = _task(kl_anneal_steps=1000)
    assert _weights(task, 400, [0, 100, 399]) == pytest.approx([0.0, 0.1, 0.399], abs=1e-12)
    one = _task(kl_anneal_steps=1)
    assert _weights(one, 400, [0, 1, 2]) == [0.0, 1.0, 1.0]


# ---------------------------------------------------------------- in a real run


class Crash(Exception):
    pass


def _record(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The KL weight of every training step's loss (validation passes none: the full β)."""
    seen: list[float] = []
    real = autoencode.autoencoder_loss

    def recording(*args: Any, **kw: Any) -> Any:
        if "weight" in kw:
            seen.append(float(kw["weight"]))
        return real(*args, **kw)

    monkeypatch.setattr(autoencode, "autoencoder_loss", recording)
    return seen


def _config(dataset: str, out: Path, **changes: Any) -> AutoencodeConfig:
    base: dict[str, Any] = dict(
        dataset=dataset, out=str(out), kind="vae", size=64, batch_size=4, latent_dim=4,
        epochs=2, steps_per_epoch=4, workers=0, lr=1e-3, beta=1.0,
    )  # fmt: skip
    return AutoencodeConfig(**{**base, **changes})


@pytest.mark.slow  # about 10 s on a busy 2-core CPU
def test_the_training_loss_gets_the_default_weight_at_each_step(
    tmp_path: Path, dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 epochs x 4 steps = 8 steps: the default ramp is 2 steps, step k gets min(1, k/2)."""
    seen = _record(monkeypatch)
    result = train_autoencode(_config(dataset.url, tmp_path / "run"))
    assert result["step"] == 8
    assert seen == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], abs=1e-12)


@pytest.mark.slow
def test_a_resumed_run_continues_the_ramp_where_it_stopped(
    tmp_path: Path, dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after step 5 (last.pt at step 3, every 3 steps): the resume trains steps 3..7
    with the weights of those steps, not a new ramp from 0, and not a ramp over what is left."""
    cfg = _config(dataset.url, tmp_path / "run", kl_anneal_steps=6, checkpoint_every=3)

    def crash(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 5:
            raise Crash

    seen = _record(monkeypatch)
    with pytest.raises(Crash):
        train_autoencode(cfg, progress=crash)
    first = list(seen)
    seen.clear()
    result = train_autoencode(cfg)
    assert result["step"] == 8
    start = 8 - len(seen)
    assert 0 < start <= len(first)  # resumed from a checkpoint the first attempt saved
    assert seen == pytest.approx([min(1.0, k / 6) for k in range(start, 8)], abs=1e-12)
