"""Executors: the experiment's independent stages at the same time, here or on a Ray cluster.

:func:`run_stages` walks the plan's graph: a stage whose inputs are done is *ready*; a ready
stage found done is skipped; the others are handed to an executor, the longest remaining
chain first, as slots free up. Two executors:

- ``LocalExecutor`` (``pneumo.experiment.executors_local``): one worker process per slot,
  started with ``spawn`` (forking a process that holds torch's threads is unsafe). A slot
  is a device (``--devices cuda:0,cuda:1``: one stage per device at a time, the device shown
  to its worker as its only GPU) or a share of the CPUs (``--parallel N``: N workers, each
  stage given ``cpus // N`` torch threads so N stages do not oversubscribe the cores).
- ``RayExecutor`` (``pneumo.experiment.executors_ray``): each stage a Ray task
  (``num_gpus=1`` for the stages that run a model when the cluster has GPUs, else CPUs), on
  the cluster ``RAY_ADDRESS`` names, or a local Ray started for the run. Every node must
  read EXP and DATASET (S3, or a shared filesystem mounted at the same path): checked on
  every node before the first stage.

On a CPU a stage's numbers depend on its torch thread count (float sums in another order;
a short training turns that into another Dice): ``--parallel N`` runs each stage with
``cpus // N`` threads, so it matches a one-after-another run with as many threads, not one
with all the cores.

What makes this safe is the stages' own protocol (``pneumo.experiment.stages``): a stage
writes into its hash-named folder and commits with ``done.json`` last, so an interrupted
stage resumes in that folder, whichever process or node picks it up next; a stage found
done is never run again; and the scheduler never hands out a stage that is running.

The first failure stops the run: the stages still running are interrupted as Ctrl-C would
(a training stage saves its place and resumes on the next run), a stage that finished
meanwhile stays committed, and :class:`StageFailed` names the stage that failed. Ctrl-C or
SIGTERM on the parent does the same.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any, Protocol

from pneumo.experiment.stages import Stage, StageFailed, StageJob, StageOutcome, StageRunner
from pneumo.shards.errors import ConfigError, PneumoError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
# The stages that run a torch model (pneumo.experiment.adapters): a GPU each when there is one.
TORCH_KINDS = frozenset(
    {"segment", "classify", "autoencode", "evaluate", "evaluate-classify", "embed"}
)
# Relative cost of a stage, only to start the longest remaining chain first.
KIND_COST = {"segment": 10, "classify": 10, "autoencode": 10}


@dataclass(frozen=True, kw_only=True)
class ExecutorConfig:
    """How the stages run.

    Attributes:
        kind: ``local`` (this machine) or ``ray`` (a Ray cluster: ``RAY_ADDRESS``, or a
            local Ray started for the run).
        parallel: local: stages at the same time on the CPUs (worker processes); 1 with no
            ``devices``: one after another in this process.
        devices: local: ``cuda:N`` (or ``cpu``) per slot; one stage per device at a time.
        grace_s: how long interrupted stages get to save their place before being killed.
    """

    kind: str = "local"
    parallel: int = 1
    devices: tuple[str, ...] = ()
    grace_s: float = 120.0

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ConfigError(f"--executor {self.kind!r}: use one of {', '.join(EXECUTORS)}")
        if self.parallel < 1:
            raise ConfigError(f"--parallel {self.parallel}: at least 1")
        bad = [d for d in self.devices if not _is_device(d)]
        if bad:
            raise ConfigError(f"--devices {','.join(bad)}: give cuda:N (or cpu) per stage slot")
        if self.devices and self.parallel not in (1, len(self.devices)):
            raise ConfigError(
                f"--parallel {self.parallel} with {len(self.devices)} --devices: the devices "
                "set how many stages run at once; leave --parallel out"
            )
        if self.kind == "ray" and (self.devices or self.parallel != 1):
            raise ConfigError(
                "--devices and --parallel are for --executor local: Ray places each stage "
                "on the cluster's GPUs or CPUs itself"
            )

    @property
    def in_process(self) -> bool:
        """One stage after another in this process (the default)."""
        return self.kind == "local" and self.parallel == 1 and not self.devices


def _is_device(text: str) -> bool:
    kind, _, index = text.partition(":")
    return text == "cpu" or (kind == "cuda" and index.isdigit())


def parse_devices(text: str | None) -> tuple[str, ...]:
    """``cuda:0,cuda:1`` -> ``("cuda:0", "cuda:1")``."""
    return tuple(d.strip() for d in (text or "").split(",") if d.strip())


@dataclass(frozen=True, kw_only=True)
class Finished:
    """A job that ended: its outcome, or the error (a one-line ``detail`` and the traceback
    text of the process it ran in)."""

    job: StageJob
    outcome: StageOutcome | None = None
    error: BaseException | None = None
    detail: str = ""
    trace: str = ""
    interrupted: bool = False


class Executor(Protocol):
    """Where jobs run. :func:`run_stages` submits at most :meth:`free` jobs, then waits."""

    def free(self) -> int: ...

    def submit(self, job: StageJob) -> None: ...

    def wait(self) -> list[Finished]:
        """Block until at least one submitted job has ended; those that have."""
        ...

    def interrupt(self) -> list[Finished]:
        """Interrupt every running job (as Ctrl-C would) and wait for them to end."""
        ...

    def close(self) -> None: ...


def run_stages(
    runner: StageRunner, stages: list[Stage], config: ExecutorConfig
) -> dict[str, dict[str, Any]]:
    """Run (or skip) ``stages`` as ``config`` says; returns ``{stage name: result}``.

    Raises:
        StageFailed: a stage raised; the message names it.
        ConfigError: the executor cannot work (a Ray node that cannot read EXP, no GPU N).
    """
    if config.in_process:
        return runner.run_all(stages)
    if len({s.name for s in stages}) != len(stages):
        raise RuntimeError("a stage is twice in the plan")  # a bug of ours: it would run twice
    executor: Executor
    if config.kind == "ray":  # ray is imported only here: an optional dependency
        from pneumo.experiment.executors_ray import RayExecutor

        executor = RayExecutor(exp=runner.exp, dataset=runner.dataset, grace_s=config.grace_s)
    else:
        from pneumo.experiment.executors_local import LocalExecutor, local_slots

        executor = LocalExecutor(local_slots(config), on_step=runner.step_event,
                                 grace_s=config.grace_s)  # fmt: skip
    try:
        _schedule(runner, stages, executor)
    finally:
        executor.close()
    return runner.results


def _schedule(runner: StageRunner, stages: list[Stage], executor: Executor) -> None:
    place = {s.name: i for i, s in enumerate(stages, 1)}
    rank = chain_costs(stages)
    pending = sorted(stages, key=lambda s: (-rank[s.name], place[s.name]))
    running: dict[str, StageJob] = {}
    checked: set[str] = set()  # found not done: no need to look again
    try:
        while pending or running:
            if _start_ready(runner, pending, running, checked, executor, place):
                continue
            if not running:  # an input outside the plan: a bug of ours
                raise RuntimeError(f"no stage can start: {[s.label for s in pending]}")
            failed = []
            for finished in executor.wait():
                del running[finished.job.stage.name]
                if finished.outcome is not None:
                    runner.finish(finished.job, finished.outcome)
                else:
                    failed.append(finished)
            if failed:
                _fail(failed[0])
    except BaseException:
        if running:
            log.warning("stopping %d running stages: %s", len(running),
                        ", ".join(j.stage.label for j in running.values()))  # fmt: skip
            for finished in executor.interrupt():
                if finished.outcome is not None:  # it committed before it could stop
                    runner.finish(finished.job, finished.outcome)
        raise


def _start_ready(
    runner: StageRunner,
    pending: list[Stage],
    running: dict[str, StageJob],
    checked: set[str],
    executor: Executor,
    place: dict[str, int],
) -> bool:
    """Skip the ready stages found done, submit the others while slots are free; whether
    anything changed."""
    changed = False
    for stage in [s for s in pending if all(i.name in runner.results for _, i in s.inputs)]:
        where = {"index": place[stage.name], "total": len(place)}
        if stage.name not in checked:
            checked.add(stage.name)
            if runner.skip_if_done(stage, **where):
                pending.remove(stage)
                changed = True
                continue
        if executor.free() > 0:
            pending.remove(stage)
            job = runner.job(stage, **where)
            runner.emit_start(job)
            executor.submit(job)
            running[stage.name] = job
            changed = True
    return changed


def _fail(finished: Finished) -> None:
    stage = finished.job.stage
    if finished.trace and not isinstance(finished.error, PneumoError):
        log.error("%s (%s) failed:\n%s", stage.label, stage.name, finished.trace.rstrip())
    raise StageFailed(
        f"stage {stage.label!r} ({stage.name}) failed: {finished.detail}. Stages done are "
        "kept and interrupted ones resume: run the command again once it is fixed",
        stage=stage.name,
        label=stage.label,
    ) from finished.error


def chain_costs(stages: list[Stage]) -> dict[str, int]:
    """Per stage, the cost (:data:`KIND_COST`) of the longest chain from it to the end of
    the plan: the stages that hold up the most work start first."""
    below: dict[str, list[Stage]] = {s.name: [] for s in stages}
    for stage in stages:
        for _, upstream in stage.inputs:
            below.setdefault(upstream.name, []).append(stage)
    costs: dict[str, int] = {}

    def cost(stage: Stage) -> int:
        if stage.name not in costs:
            rest = max((cost(d) for d in below.get(stage.name, [])), default=0)
            costs[stage.name] = KIND_COST.get(stage.kind, 1) + rest
        return costs[stage.name]

    for stage in stages:
        cost(stage)
    return costs


def describe_error(e: BaseException) -> tuple[str, str]:
    """``(one line, traceback text)`` of an error raised by a stage."""
    if isinstance(e, (PneumoError, FileNotFoundError, PermissionError)):
        line = str(e)
    elif isinstance(e, KeyboardInterrupt):
        line = "interrupted"
    else:
        line = f"{type(e).__name__}: {e}"
    return line, "".join(traceback.format_exception(e))
