"""Loader workers: how many by default (the CPUs a process may use, cgroup quotas included,
shared by the node's processes), and one set of them serving a whole run (every epoch,
PreciseBN, validation) with exactly the batches of a fresh loader per pass."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from processes import children
from test_log_every import TinyTask, tiny

from pneumo.shards import stream
from pneumo.shards.errors import ConfigError
from pneumo.training import loop, start
from pneumo.training.checkpoint import load_checkpoint
from pneumo.training.data import LoaderConfig, eval_batches, select, train_batches
from pneumo.training.run_loader import RunLoader
from pneumo.training.runs import DistEnv, RunDir, available_cpus, default_workers

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# ---------------------------------------------------------------- how many


@pytest.fixture
def sixty_four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process allowed on 64 CPUs by its affinity mask."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_or_a_parent(tmp_path: Path, sixty_four_cpus) -> None:
    root, me = tmp_path / "cgroup", tmp_path / "self"
    write(me, "0::/kubepods/pod1/ctr\n")
    write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")  # no limit of its own
    assert available_cpus(root, me) == 64
    write(root / "kubepods/pod1/cpu.max", "250000 100000\n")  # the pod's: 2.5 CPUs
    assert available_cpus(root, me) == 3  # rounded up: a half CPU is still worth a worker
    write(root / "kubepods/pod1/ctr/cpu.max", "100000 100000\n")  # tighter below it
    assert available_cpus(root, me) == 1


def test_cgroup_v2_seen_from_inside_a_container(tmp_path: Path, sixty_four_cpus) -> None:
    """A cgroup namespace shows the container's own cgroup as the root, and a path that
    is not under it: the root's cpu.max counts."""
    root, me = tmp_path / "cgroup", tmp_path / "self"
    write(me, "0::/\n")
    write(root / "cpu.max", "400000 100000\n")
    assert available_cpus(root, me) == 4
    write(me, "0::/../../somewhere/else\n")
    assert available_cpus(root, me) == 4


def test_cgroup_v1_cfs_quota(tmp_path: Path, sixty_four_cpus) -> None:
    root, me = tmp_path / "cgroup", tmp_path / "self"
    write(me, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n")
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")  # no quota
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert available_cpus(root, me) == 64
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "600000\n")
    assert available_cpus(root, me) == 6
    # Only a "cpu" folder (the controllers mounted apart), the quota at its root.
    other = tmp_path / "other"
    write(other / "cpu/cpu.cfs_quota_us", "150000\n")
    write(other / "cpu/cpu.cfs_period_us", "50000\n")
    assert available_cpus(other, me) == 3


def test_no_cgroup_files_leave_the_affinity_mask(tmp_path: Path, sixty_four_cpus) -> None:
    assert available_cpus(tmp_path / "none", tmp_path / "none" / "self") == 64
    write(tmp_path / "self", "0::/x\n")
    write(tmp_path / "cgroup/x/cpu.max", "not numbers\n")
    assert available_cpus(tmp_path / "cgroup", tmp_path / "self") == 64


def test_this_machine_s_own_files_give_at_most_its_cpus() -> None:
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)


def test_default_workers_share_the_cpus_and_keep_one_per_process() -> None:
    assert default_workers(64) == 16  # capped
    assert default_workers(16) == 15
    assert default_workers(16, local_world_size=4) == 3
    assert default_workers(16, local_world_size=8) == 1
    assert default_workers(2) == 1
    assert default_workers(1, local_world_size=4) == 1  # never none


def test_the_local_world_size_is_read_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DistEnv.from_env().local_world_size == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert DistEnv.from_env().local_world_size == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "four")
    with pytest.raises(ConfigError, match="LOCAL_WORLD_SIZE"):
        DistEnv.from_env()


# ---------------------------------------------------------------- one set of workers


def _same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [b["key"] for b in got] == [b["key"] for b in want]
    for a, b in zip(got, want, strict=True):  # the same augmentation too
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


@linux_only
def test_one_run_loader_gives_every_pass_the_batches_of_a_fresh_loader(dataset) -> None:
    """Epoch 0, PreciseBN's first 2 batches of it, validation, epoch 1 resumed at step 3,
    epoch 1 whole, validation again: each pass is exactly what a loader made for it gives,
    and the same two worker processes make them all."""
    train = LoaderConfig(dataset=dataset.url, size=32, batch_size=3, workers=2, pos_rate=(0.8, 0.2))
    val = LoaderConfig(dataset=dataset.url, size=32, batch_size=3, workers=2, augment=False)
    rows = select(dataset.url, "split == 'train' and has_ptx is not None")
    pools = stream.class_pools(stream.entries_from_table(rows), train.pos_rate)
    entries = stream.entries_from_table(select(dataset.url, "split == 'val'"))
    where = dict(rank=0, world_size=1, steps_per_epoch=5, total_steps=10)

    def fresh(epoch: int, start_step: int = 0) -> list[dict[str, Any]]:
        return list(train_batches(train, epoch=epoch, start_step=start_step, pools=pools, **where))

    fresh_val = list(eval_batches(val, rank=0, world_size=1, entries=entries))
    before = children()
    workers: set[frozenset[int]] = set()
    with RunLoader(train, val, pools=pools, val_entries=entries, **where) as loader:
        passes = [(list(loader.train(0)), fresh(0))]
        precise_bn = loader.train(0)  # stopped after 2 of 5 batches
        passes.append(([next(precise_bn), next(precise_bn)], fresh(0)[:2]))
        passes.append((list(loader.val()), fresh_val))
        passes.append((list(loader.train(1, start_step=3)), fresh(1, start_step=3)))
        workers.add(frozenset(children() - before))
        passes.append((list(loader.train(1)), fresh(1)))
        passes.append((list(loader.val()), fresh_val))
        workers.add(frozenset(children() - before))
    for got, want in passes:
        _same(got, want)
    assert (
        len(passes[0][0]) == 5 and len(passes[3][0]) == 2 and len(passes[2][0]) == 4
    )  # 8 val images, 2 workers
    (same,) = workers
    assert len(same) == 2  # one set of workers, never restarted
    assert not children() - before  # closed: they are gone


def test_a_run_loader_in_process_and_its_checks(dataset) -> None:
    train = LoaderConfig(dataset=dataset.url, size=32, batch_size=3, workers=0)
    rows = select(dataset.url, "split == 'train' and has_ptx is not None")
    pools = stream.class_pools(stream.entries_from_table(rows), None)
    where = dict(rank=0, world_size=1, steps_per_epoch=4, total_steps=8, pools=pools)
    with RunLoader(train, train, val_entries=[], **where) as loader:
        _same(list(loader.train(1, 1)), list(train_batches(train, epoch=1, start_step=1, **where)))
        assert list(loader.val()) == []  # a rank without validation rows
        with pytest.raises(ConfigError, match="start step 5"):
            loader.train(0, start_step=5)
        stale = loader.train(0)
        loader.val()
        with pytest.raises(RuntimeError, match="newer one"):
            next(stale)
    other = LoaderConfig(dataset=dataset.url, size=32, batch_size=3, workers=1)
    with pytest.raises(ConfigError, match="one dataset and workers"):
        RunLoader(train, other, val_entries=[], **where)


@linux_only
@pytest.mark.slow
def test_a_run_trains_validates_and_resumes_on_one_set_of_workers(
    dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 workers, 2 epochs of 3 steps, PreciseBN over 2 batches: the steps, PreciseBN and
    validation see the batches of the one-shot loaders, from the same two processes; a
    run stopped after step 4 resumes with step 5's batch."""
    seen: list[tuple[str, list[str], frozenset[int]]] = []
    loss, validate = TinyTask.loss, TinyTask.validate

    def recorded_loss(self: TinyTask, job: Any, batch: dict[str, Any]) -> torch.Tensor:
        kind = "train" if torch.is_grad_enabled() else "precise_bn"
        seen.append((kind, list(batch["key"]), frozenset(children())))
        return loss(self, job, batch)

    def recorded_validate(self: TinyTask, job: Any, batches: Any) -> Any:
        keys = []

        def tap() -> Any:
            for b in batches:
                keys.extend(b["key"])
                yield b

        part = validate(self, job, tap())
        seen.append(("val", keys, frozenset(children())))
        return part

    monkeypatch.setattr(TinyTask, "loss", recorded_loss)
    monkeypatch.setattr(TinyTask, "validate", recorded_validate)
    cfg = tiny(dataset.url, tmp_path / "run", epochs=2, steps_per_epoch=3, workers=2)
    cfg = replace(cfg, precise_bn=2, batch_size=3)
    loop.run(TinyTask(cfg))

    task = TinyTask(cfg)
    train_cfg, val_cfg = task.loader(train=True), task.loader(train=False)
    pools = task.pools(RunDir(cfg.out).get_table("rows/train.parquet"))
    val_rows = RunDir(cfg.out).get_table("rows/val.parquet")
    where = dict(rank=0, world_size=1, steps_per_epoch=3, total_steps=6, pools=pools)

    def keys(batches: Any, n: int | None = None) -> list[list[str]]:
        return [b["key"] for b in list(batches)[:n]]

    val_keys = [k for b in eval_batches(val_cfg, rank=0, world_size=1,
                entries=stream.entries_from_table(val_rows)) for k in b["key"]]  # fmt: skip
    want = []
    for epoch in range(2):
        want += [("train", k) for k in keys(train_batches(train_cfg, epoch=epoch, **where))]
        want += [("precise_bn", k) for k in keys(train_batches(train_cfg, epoch=epoch, **where), 2)]
        want += [("val", val_keys)]
    assert [(kind, k) for kind, k, _ in seen] == want
    assert len({pids for _, _, pids in seen}) == 1  # the same workers throughout

    seen.clear()

    def stop_after_4(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 4:
            raise KeyboardInterrupt

    other = replace(cfg, out=str(tmp_path / "again"))
    with pytest.raises(KeyboardInterrupt):
        loop.run(TinyTask(other), progress=stop_after_4)
    assert load_checkpoint(other.out, "last")["step"] == 4
    seen.clear()
    loop.run(TinyTask(other))
    assert [(kind, k) for kind, k, _ in seen] == want[-5:]  # steps 5, 6, PreciseBN, val


@pytest.mark.slow
def test_unset_workers_come_from_the_cpus_then_from_the_run(
    dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh run takes default_workers of the CPUs (recorded); its resume on a machine
    with more CPUs keeps the run's count when --workers is not given."""
    monkeypatch.setattr(start, "available_cpus", lambda: 3)
    cfg = tiny(dataset.url, tmp_path / "run", epochs=2, steps_per_epoch=2, workers=None)
    assert cfg.workers is None and cfg.loader_workers == 0

    def stop_after_3(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.run(TinyTask(cfg), progress=stop_after_3)
    assert load_checkpoint(cfg.out, "last")["config"]["workers"] == 2  # 3 CPUs, one kept
    monkeypatch.setattr(start, "available_cpus", lambda: 9)
    assert loop.run(TinyTask(cfg))["step"] == 4
    assert load_checkpoint(cfg.out, "last")["config"]["workers"] == 2
    # Another --workers is an elastic resume (tests/training/test_elastic_resume.py): it
    # goes on, and config.json records the change.
    assert loop.run(TinyTask(replace(cfg, workers=1)))["step"] == 4
    layouts = json.loads((Path(cfg.out) / "config.json").read_text())["layouts"]
    assert layouts == [{"step": 0, "world_size": 1, "workers": 2},
                       {"step": 4, "world_size": 1, "workers": 1}]  # fmt: skip
