"""Executors: independent stages at the same time in worker processes (``--parallel``) or as
Ray tasks, with the same results as one after another; the first failure named, nothing
half-committed, done stages never run again, SIGTERM stopping the workers.

The synthetic stages (``thing``) count their calls in a file, so calls made in worker
processes count too; two of them *meet* (each waits until the other has started), which
only stages running at the same time can do.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pneumo.experiment.executors import ExecutorConfig, chain_costs, run_stages
from pneumo.experiment.executors_local import local_slots
from pneumo.experiment.recipe import load_recipe
from pneumo.experiment.run import ExperimentConfig, make_plan, run_experiment
from pneumo.experiment.stages import (
    DONE_FILE,
    STAGE_FILE,
    Stage,
    StageContext,
    StageFailed,
    StageRunner,
)
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import open_store

WAIT_S = 60.0  # a meeting or a hold longer than this fails the test


# ------------------------------------------------------------------ synthetic stages


def thing(ctx: StageContext) -> dict[str, Any]:
    """``value`` plus its inputs' totals, after what the settings ask: ``meet`` (a folder):
    say it started there, then wait for ``others`` to say so; ``fail`` (a path): raise while
    no file is there; ``hold`` (a path): while no file is there, wait (``WAIT_S`` at most)
    for the interruption that must stop it."""
    s, label = ctx.stage.settings, ctx.stage.label
    with open(s["calls"], "a") as f:
        f.write(f"{label}\n")
    store = open_store(ctx.url)
    store.put("partial.txt", b"half")
    if "meet" in s:
        _meet(Path(s["meet"]), label, s["others"])
    if "fail" in s and not Path(s["fail"]).exists():
        raise ValueError(f"planted failure in {label}")
    if "hold" in s:
        deadline = time.monotonic() + WAIT_S
        while not Path(s["hold"]).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    total = s["value"] + sum(r["total"] for r in ctx.inputs.values())
    store.put("out.txt", str(total).encode())
    return {"total": total, "pid": os.getpid()}


def _meet(folder: Path, label: str, others: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / label).touch()
    deadline = time.monotonic() + WAIT_S
    while not all((folder / other).exists() for other in others):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label} never met {others}: they did not run at the same time")
        time.sleep(0.02)


def diamond(root: Path, **extra: dict[str, Any]) -> list[Stage]:
    """a -> (b, c) -> d; ``extra``: more settings per label."""

    def settings(label: str, value: int) -> dict[str, Any]:
        return {"value": value, "calls": str(root / "calls.txt"), **extra.get(label, {})}

    a = Stage(kind="thing", label="a", settings=settings("a", 1))
    b = Stage(kind="thing", label="b", settings=settings("b", 10), inputs=(("in", a),))
    c = Stage(kind="thing", label="c", settings=settings("c", 100), inputs=(("in", a),))
    d = Stage(kind="thing", label="d", settings=settings("d", 1000), inputs=(("x", b), ("y", c)))
    return [a, b, c, d]


def calls(root: Path) -> Counter[str]:
    path = root / "calls.txt"
    return Counter(path.read_text().split() if path.exists() else [])


def runner(
    exp: Path, events: list[dict[str, Any]] | None = None, dataset: str = "unused"
) -> StageRunner:
    progress = events.append if events is not None else None
    return StageRunner(exp=str(exp), dataset=dataset, functions={"thing": thing},
                       progress=progress)  # fmt: skip


def statuses(events: list[dict[str, Any]]) -> dict[str, str]:
    """label -> how it started (run, resume) or skip."""
    return {e["label"]: e["status"] for e in events if e["status"] in ("run", "resume", "skip")}


def meeting(tmp_path: Path) -> dict[str, dict[str, Any]]:
    folder = str(tmp_path / "meet")
    return {"b": {"meet": folder, "others": ["c"]}, "c": {"meet": folder, "others": ["b"]}}


def check_committed(exp: Path, stages: list[Stage]) -> None:
    """Every ``done.json`` is whole and its stage's output is there: nothing half-committed."""
    for stage in stages:
        done = exp / stage.path / DONE_FILE
        if done.exists():
            record = json.loads(done.read_text())
            assert record["stage"] == stage.name
            assert (exp / stage.path / "out.txt").read_text() == str(record["result"]["total"])


# ------------------------------------------------------------------ worker processes


def test_parallel_runs_independent_stages_at_once_and_never_reruns_a_done_one(tmp_path) -> None:
    stages = diamond(tmp_path, **meeting(tmp_path))
    events: list[dict[str, Any]] = []
    results = run_stages(runner(tmp_path / "exp", events), stages, ExecutorConfig(parallel=2))
    assert [results[s.name]["total"] for s in stages] == [1, 11, 101, 1112]  # by hand
    assert calls(tmp_path) == Counter(a=1, b=1, c=1, d=1)
    assert results[stages[1].name]["pid"] != results[stages[2].name]["pid"]
    assert os.getpid() not in {r["pid"] for r in results.values()}  # all in workers
    assert statuses(events) == {"a": "run", "b": "run", "c": "run", "d": "run"}
    check_committed(tmp_path / "exp", stages)
    again: list[dict[str, Any]] = []
    rerun = run_stages(runner(tmp_path / "exp", again), diamond(tmp_path, **meeting(tmp_path)),
                       ExecutorConfig(parallel=2))  # fmt: skip
    assert calls(tmp_path) == Counter(a=1, b=1, c=1, d=1)  # nothing ran again
    assert statuses(again) == dict.fromkeys("abcd", "skip") and rerun == results


def test_a_failing_stage_is_named_the_others_stop_and_a_rerun_resumes(tmp_path) -> None:
    fix, release, meet = tmp_path / "fixed", tmp_path / "released", str(tmp_path / "meet")
    extra = {  # c fails once b runs; b would go on for a minute unless interrupted
        "b": {"hold": str(release), "meet": meet, "others": []},
        "c": {"fail": str(fix), "meet": meet, "others": ["b"]},
    }
    stages, exp = diamond(tmp_path, **extra), tmp_path / "exp"
    started = time.monotonic()
    with pytest.raises(StageFailed) as failed:
        run_stages(runner(exp), stages, ExecutorConfig(parallel=2))
    assert time.monotonic() - started < WAIT_S  # b was stopped, not waited for
    c = stages[2]
    assert f"stage 'c' ({c.name}) failed: ValueError: planted failure in c" in str(failed.value)
    assert failed.value.label == "c" and isinstance(failed.value.__cause__, ValueError)
    for stage in stages[1:3]:  # begun, interrupted, not committed
        assert (exp / stage.path / STAGE_FILE).exists()
        assert not (exp / stage.path / DONE_FILE).exists()
    assert not (exp / stages[3].path).exists()  # d never started
    check_committed(exp, stages)
    fix.touch()
    release.touch()
    events: list[dict[str, Any]] = []
    results = run_stages(runner(exp, events), stages, ExecutorConfig(parallel=2))
    assert statuses(events) == {"a": "skip", "b": "resume", "c": "resume", "d": "run"}
    assert results[stages[3].name]["total"] == 1112
    assert calls(tmp_path) == Counter(a=1, b=2, c=2, d=1)  # a done once, never again
    check_committed(exp, stages)


def test_the_longest_chain_starts_first() -> None:
    audit = Stage(kind="audit", label="audit", settings={})
    ae = Stage(kind="autoencode", label="ae", settings={"k": "ae"}, inputs=(("d", audit),))
    vae = Stage(kind="autoencode", label="vae", settings={"k": "vae"}, inputs=(("d", audit),))
    embed = Stage(kind="embed", label="embed", settings={}, inputs=(("run", vae),))
    seg = Stage(kind="segment", label="seg", settings={}, inputs=(("enc", embed),))
    costs = chain_costs([audit, ae, vae, embed, seg])
    # by hand: segment 10, embed 1 + 10, vae 10 + 11, ae 10 alone, audit 1 + 21
    assert costs == {audit.name: 22, ae.name: 10, vae.name: 21, embed.name: 11, seg.name: 10}


def test_slots_share_the_cpus_and_show_each_worker_its_gpu(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cpu = local_slots(ExecutorConfig(parallel=3), cpus=8)
    assert [(s.device, s.threads, s.env["CUDA_VISIBLE_DEVICES"]) for s in cpu] == [
        ("cpu", 2, "")
    ] * 3
    assert local_slots(ExecutorConfig(parallel=4), cpus=2)[0].threads == 1
    gpus = local_slots(ExecutorConfig(devices=("cuda:0", "cuda:1")), cpus=16)
    assert [(s.env["CUDA_VISIBLE_DEVICES"], s.threads) for s in gpus] == [("0", 8), ("1", 8)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # cuda:1 of this process is GPU 6
    assert (
        local_slots(ExecutorConfig(devices=("cuda:1",)), cpus=4)[0].env["CUDA_VISIBLE_DEVICES"]
        == "6"
    )
    with pytest.raises(ConfigError, match="cuda:2: CUDA_VISIBLE_DEVICES shows 2"):
        local_slots(ExecutorConfig(devices=("cuda:2",)), cpus=4)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "slurm"}, "--executor 'slurm'"),
        ({"parallel": 0}, "--parallel 0"),
        ({"devices": ("gpu0",)}, "--devices gpu0"),
        ({"devices": ("cuda:0", "cuda:1"), "parallel": 3}, "the devices set how many"),
        ({"kind": "ray", "parallel": 2}, "are for --executor local"),
    ],
)
def test_executor_settings_that_cannot_work_are_refused(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ExecutorConfig(**settings)


def test_the_cli_refuses_bad_devices_in_one_line(pneumo, tmp_path) -> None:
    proc = pneumo("experiment", str(tmp_path), "--out", str(tmp_path / "exp"),
                  "--devices", "gpu0", check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --devices gpu0: give cuda:N (or cpu) per stage slot"
    ]


# ------------------------------------------------------------------ the tiny experiment


def tiny_config(dataset: str, out: Path, recipe: Path, **kw: Any) -> ExperimentConfig:
    return ExperimentConfig(dataset=dataset, out=str(out), recipe=load_recipe(recipe), **kw)


def table1(out: str | Path) -> tuple[dict[str, dict[str, str]], str]:
    with open(Path(out) / "table1.csv", newline="") as f:
        rows = {row["arm"]: row for row in csv.DictReader(f)}
    return rows, (Path(out) / "table1.md").read_text()


@pytest.fixture(scope="module")
def inline_table(demo_dataset, tiny_recipe_file, tmp_path_factory) -> Any:
    """Table 1 of the tiny recipe, its stages one after another in this process, with one
    torch thread: what each stage gets below (--parallel 2 on 2 CPUs, a 1-CPU Ray task).
    On a CPU the thread count changes a float sum's order, and a few steps of training
    from there turn that into another Dice."""
    import torch

    dataset, _ = demo_dataset
    cfg = tiny_config(dataset, tmp_path_factory.mktemp("inline"), tiny_recipe_file)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(cfg)
    finally:
        torch.set_num_threads(threads)
    rows, text = table1(cfg.out)
    assert set(rows) == {"none"} and float(rows["none"]["dice_mean"]) > 0
    return rows, text


def check_committed_stages(exp: Path, stages: list[Stage]) -> None:
    """A stage with a ``done.json`` is whole: the record names it, its outputs are there."""
    for stage in stages:
        done = exp / stage.path / DONE_FILE
        if done.exists():
            assert json.loads(done.read_text())["stage"] == stage.name
            if stage.kind == "segment":
                assert (exp / stage.path / "checkpoints" / "best.pt").exists()


def _stage_workers(pid: int) -> list[int]:
    """The worker processes ``pid`` spawned (not multiprocessing's resource tracker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(p) for p in path.read_text().split()] if path.exists() else []
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" in status.read_text()  # a zombie has stopped
    except FileNotFoundError:
        return True


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_stops_the_workers_then_parallel_finishes_with_the_same_table(
    demo_dataset, tiny_recipe_file, tmp_path, inline_table, monkeypatch
) -> None:
    two_cpus = sorted(os.sched_getaffinity(0))[:2]  # --parallel 2: one thread per stage
    monkeypatch.setattr("pneumo.training.runs.available_cpus", lambda: len(two_cpus))
    dataset, _ = demo_dataset
    exp = tmp_path / "exp"
    command = [sys.executable, "-m", "pneumo", "experiment", dataset, "--out", str(exp)]
    command += ["--recipe", str(tiny_recipe_file), "--parallel", "2"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, two_cpus),
    )
    try:
        deadline = time.monotonic() + 300
        while not (victims := list(exp.glob("stages/segment-*/checkpoints/last.pt"))):
            assert proc.poll() is None, f"ended before a checkpoint: {proc.communicate()}"
            assert time.monotonic() < deadline, "no segmentation checkpoint in 300 s"
            time.sleep(0.05)
        workers = _stage_workers(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert len(workers) == 2 and all(_gone(pid) for pid in workers)
    cfg = tiny_config(dataset, exp, tiny_recipe_file, executor=ExecutorConfig(parallel=2))
    plan = make_plan(cfg)
    folders = {s.label: exp / s.path for s in plan.stages}
    # what each stage must do on the rerun, from what the kill left
    expected = {
        label: "skip" if (f / DONE_FILE).exists() else "resume" if (f / STAGE_FILE).exists()
        else "run"
        for label, f in folders.items()
    }  # fmt: skip
    stopped = {label for label, f in folders.items() if f / "checkpoints" / "last.pt" in victims}
    assert stopped and {expected[label] for label in stopped} == {"resume"}  # not waited for
    check_committed_stages(exp, plan.stages)
    events: list[dict[str, Any]] = []
    run_experiment(cfg, progress=events.append)
    assert statuses([e for e in events if e["event"] == "stage"]) == expected
    rows, text = table1(exp)
    assert rows == inline_table[0] and text == inline_table[1]


# ------------------------------------------------------------------ Ray


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """A Ray of 2 CPUs on this machine; the synthetic stages travel by value."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@pytest.mark.integration
@pytest.mark.slow
def test_ray_gives_the_same_table_and_reruns_nothing(
    local_ray, demo_dataset, tiny_recipe_file, tmp_path, inline_table
) -> None:
    dataset, _ = demo_dataset
    cfg = tiny_config(dataset, tmp_path / "exp", tiny_recipe_file,
                      executor=ExecutorConfig(kind="ray"))  # fmt: skip
    events: list[dict[str, Any]] = []
    run_experiment(cfg, progress=events.append)
    assert set(statuses(events).values()) == {"run"}
    rows, text = table1(cfg.out)
    assert rows == inline_table[0] and text == inline_table[1]
    done = {p: p.read_bytes() for p in (tmp_path / "exp").glob(f"stages/*/{DONE_FILE}")}
    again: list[dict[str, Any]] = []
    run_experiment(replace(cfg), progress=again.append)
    assert set(statuses(again).values()) == {"skip"} and len(statuses(again)) == len(done)
    assert {p: p.read_bytes() for p in done} == done


@pytest.mark.integration
def test_ray_names_the_failing_stage_and_keeps_what_is_done(
    local_ray, demo_dataset, tmp_path
) -> None:
    stages, exp = diamond(tmp_path, c={"fail": str(tmp_path / "fixed")}), tmp_path / "exp"
    dataset, _ = demo_dataset  # every node must read it, as EXP
    with pytest.raises(StageFailed, match=r"stage 'c' \(thing-\w+\) failed: ValueError: planted"):
        run_stages(runner(exp, dataset=dataset), stages, ExecutorConfig(kind="ray"))
    assert not (exp / stages[2].path / DONE_FILE).exists() and not (exp / stages[3].path).exists()
    check_committed(exp, stages)
    (tmp_path / "fixed").touch()
    events: list[dict[str, Any]] = []
    results = run_stages(runner(exp, events, dataset), stages, ExecutorConfig(kind="ray"))
    assert results[stages[3].name]["total"] == 1112
    assert statuses(events)["a"] == "skip" and statuses(events)["c"] == "resume"
    assert calls(tmp_path)["a"] == 1


@pytest.mark.integration
def test_ray_refuses_data_a_node_cannot_read(local_ray, tmp_path) -> None:
    from pneumo.experiment.executors_ray import RayExecutor

    with pytest.raises(ConfigError, match=r"Ray node .* cannot read .* s3:// prefix"):
        RayExecutor(exp=str(tmp_path / "exp"), dataset=str(tmp_path / "not-there"))
