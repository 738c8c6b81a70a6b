"""A run resumed on another number of processes and loader workers (gloo ranks, as
torchrun starts them): each step trains the samples the uninterrupted run's step did, so
every pass still gives every sample once; the learning-rate schedule goes on by steps of
the same number of samples; config.json records each layout. The stream's side, for any
layout: tests/shards/test_elastic.py."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from elastic_helper import recorded_run
from ranks_helper import run_ranks
from test_log_every import TinyTask, tiny

from pneumo.shards.errors import ConfigError
from pneumo.training import start
from pneumo.training.checkpoint import load_checkpoint
from pneumo.training.runs import DistEnv

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def steps_trained(log: Path) -> dict[int, Counter[str]]:
    """Global step -> the keys all ranks trained in it."""
    out: dict[int, Counter[str]] = {}
    for path in sorted(log.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], Counter()).update(row["keys"])
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("before", "after", "batch", "stop"),
    [((2, 1), (1, 2), 2, 2), ((1, 1), (3, 2), 3, 4)],
    ids=["2-to-1-processes", "1-to-3-processes"],
)
def test_a_run_resumed_on_another_layout_trains_the_planned_steps(
    dataset, tmp_path: Path, before: tuple[int, int], after: tuple[int, int], batch: int,
    stop: int,
) -> None:  # fmt: skip
    """(processes, loader workers) before and after a stop mid-epoch (2 epochs of 3 steps)."""
    whole_log, cut_log = tmp_path / "whole-log", tmp_path / "cut-log"
    whole_log.mkdir(), cut_log.mkdir()
    cfg = tiny(dataset.url, tmp_path / "whole", epochs=2, steps_per_epoch=3, batch_size=batch,
               workers=before[1])  # fmt: skip
    run_ranks(recorded_run, (cfg, None, str(whole_log)), world_size=before[0])
    cut = replace(cfg, out=str(tmp_path / "cut"))
    run_ranks(recorded_run, (cut, stop, str(cut_log)), world_size=before[0])
    assert load_checkpoint(cut.out, "last")["step"] == stop  # stopped mid-epoch
    resumed = replace(cut, workers=after[1])
    run_ranks(recorded_run, (resumed, None, str(cut_log)), world_size=after[0])

    whole, elastic = steps_trained(whole_log), steps_trained(cut_log)
    assert sorted(elastic) == sorted(whole) == list(range(6))
    assert elastic == whole  # every step its planned samples: no duplicates, no gaps
    # Every rank of the new layout trained an equal part of each step after the resume.
    for rank in range(after[0]):
        rows = [json.loads(x) for x in (cut_log / f"rank{rank}.jsonl").read_text().splitlines()]
        late = [r for r in rows if r["step"] >= stop]
        assert [r["step"] for r in late] == list(range(stop, 6))
        assert all(len(r["keys"]) == before[0] * batch // after[0] for r in late)
    # The schedule went on by steps of the planned size: the same rates epoch by epoch.
    assert [m["lr"] for m in metrics(Path(cut.out))] == [m["lr"] for m in metrics(Path(cfg.out))]
    config = json.loads((Path(cut.out) / "config.json").read_text())
    assert config["plan"] == {"world_size": before[0], "workers": before[1]}
    assert config["layouts"] == [
        {"step": 0, "world_size": before[0], "workers": before[1]},
        {"step": stop, "world_size": after[0], "workers": after[1]},
    ]


def test_a_layout_that_cannot_share_the_step_is_refused(dataset, tmp_path: Path) -> None:
    """2 processes x 2 images a step cannot be split over 3 processes: one line says so
    (checked as the third process would, before any process group is made)."""
    log = tmp_path / "log"
    log.mkdir()
    cfg = tiny(dataset.url, tmp_path / "run", epochs=1, steps_per_epoch=3, workers=0)
    run_ranks(recorded_run, (cfg, 1, str(log)), world_size=2)
    ckpt = load_checkpoint(cfg.out, "last")
    with pytest.raises(ConfigError, match="2 processes x 2 images a step, which 3 processes"):
        start._check_settings(TinyTask(cfg), DistEnv(world_size=3), ckpt, cfg.out)
    start._check_settings(TinyTask(cfg), DistEnv(world_size=4), ckpt, cfg.out)  # 1 image each
