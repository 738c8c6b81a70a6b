"""Stages named by what they depend on: skipped when done, resumed when interrupted.

A :class:`Stage` is a function of its settings and of its input stages. Its name is
``<kind>-<hash>``, the hash covering the kind, the settings and the hashes of the inputs
(so, transitively, everything upstream), and its output lives at ``EXP/stages/<name>/``.
Change one setting and only the stages whose hash changes — that stage and everything
downstream of it — get a new folder and run; the others are found done and skipped. This
is how build systems (and img2dataset's per-shard markers) make reruns cheap and safe.

The folder of a stage holds:

- ``stage.json``: what the stage is (kind, settings, inputs), written when it starts;
- whatever the stage writes (a training RUN, a label table, an evaluation);
- ``done.json``: its result, written **last**, in one atomic put. A folder without it is
  an interrupted attempt: with ``resume="auto"`` the stage runs again in the same folder and
  a training stage continues from its last checkpoint; with ``"never"`` the folder is emptied
  first.

Stages run one after another in this process (:meth:`StageRunner.run_all`) or, the
independent ones at the same time, in worker processes or on a Ray cluster
(``pneumo.experiment.executors``); either way :func:`execute_stage` runs each one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pneumo.shards.errors import ConfigError, PneumoError
from pneumo.shards.store import Store, open_store
from pneumo.training import tracking
from pneumo.training.tracking import TrackingConfig

log = logging.getLogger(__name__)

STAGE_FORMAT = "pneumo.stage/1"  # bump to invalidate every stage of older experiments
STAGE_FILE = "stage.json"
DONE_FILE = "done.json"
RESUME_MODES = ("auto", "never")

Progress = Callable[[dict[str, Any]], None]


class StageFailed(PneumoError):
    """A stage raised; the message names it (``label``, ``stage``: its folder name), the
    original error is the ``__cause__``."""

    def __init__(self, message: str, *, stage: str, label: str) -> None:
        super().__init__(message)
        self.stage, self.label = stage, label


@dataclass(frozen=True, kw_only=True, eq=False)
class Stage:
    """One step of an experiment.

    Attributes:
        kind: what runs it (a key of the runner table: ``segment``, ``classify``, ...).
        label: a human name (``segment labels seed 1``); not part of the hash.
        settings: JSON-able values the result depends on.
        inputs: ``(role, stage)`` pairs this one reads the outputs of.
    """

    kind: str
    label: str
    settings: Mapping[str, Any]
    inputs: tuple[tuple[str, Stage], ...] = ()

    @cached_property
    def digest(self) -> str:
        spec = {
            "format": STAGE_FORMAT,
            "kind": self.kind,
            "settings": self.settings,
            "inputs": {role: stage.digest for role, stage in self.inputs},
        }
        return hashlib.sha256(canonical_json(spec).encode()).hexdigest()

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.digest[:12]}"

    @property
    def path(self) -> str:
        """The stage's folder, relative to EXP."""
        return f"stages/{self.name}"

    def input(self, role: str) -> Stage:
        for r, stage in self.inputs:
            if r == role:
                return stage
        raise KeyError(f"{self.label} has no input {role!r}")


def canonical_json(obj: Any) -> str:
    """The one text of ``obj`` that is hashed: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True, kw_only=True)
class StageContext:
    """What a stage function gets: where to write, what its inputs produced."""

    stage: Stage
    dataset: str  # the DATASET URL (not hashed: the audit stage hashes its content)
    url: str  # the stage's folder, as a URL the libraries accept
    inputs: Mapping[str, dict[str, Any]]  # role -> that input's result (its done.json)
    input_urls: Mapping[str, str]  # role -> that input's folder URL
    progress: Progress | None = None


StageFunction = Callable[[StageContext], dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class StageJob:
    """Everything needed to run one stage in any process: this process, a worker process of
    ``--parallel``, a Ray task on another node. Picklable: the function is a module-level one.

    Attributes:
        exp: EXP, the experiment's folder or ``s3://`` prefix.
        resume: ``auto`` or ``never`` (see :class:`StageRunner`).
        index, total: the stage's place in the plan, for progress lines.
        tracking: where the stage's MLflow run goes (carried in the job: a worker process
            or a Ray node does not see this process's settings).
    """

    exp: str
    dataset: str
    stage: Stage
    function: StageFunction
    inputs: Mapping[str, dict[str, Any]]
    input_urls: Mapping[str, str]
    resume: str = "auto"
    index: int = 1
    total: int = 1
    tracking: TrackingConfig | None = None  # MLflow: the experiment run's, for a nested run


@dataclass(frozen=True, kw_only=True)
class StageOutcome:
    """What running a job gave: ``status`` ``run``, ``resume`` (an interrupted attempt's
    folder was continued) or ``skip`` (found done), and its ``done.json`` record."""

    status: str
    record: dict[str, Any]


def execute_stage(job: StageJob, progress: Progress | None = None) -> StageOutcome:
    """Run one stage in this process and commit it (``done.json``, written last).

    The one place where a stage's function is called, whichever executor runs it (the hook
    for anything wrapped around a stage: tracking, timing). It checks ``done.json`` again,
    so a stage finished meanwhile (by another attempt) is never run twice. ``progress`` gets
    the stage function's own progress dicts.
    """
    stage, store = job.stage, open_store(job.exp)
    if store.exists(f"{stage.path}/{DONE_FILE}"):
        return StageOutcome(status="skip", record=read_done(store, stage))
    interrupted = store.exists(f"{stage.path}/{STAGE_FILE}")
    if interrupted and job.resume == "never":
        for path in store.list(stage.path):
            store.delete(path)
        interrupted = False
    _put_json(store, f"{stage.path}/{STAGE_FILE}", _describe(stage))
    context = StageContext(
        stage=stage,
        dataset=job.dataset,
        url=store.url_of(stage.path),
        inputs=job.inputs,
        input_urls=job.input_urls,
        progress=progress,
    )
    started = time.perf_counter()
    # With tracking on, the stage is an MLflow run nested under the experiment's, whatever
    # process runs it; the training or evaluation inside logs into it.
    result = tracking.nested(
        job.function, job.tracking, name=stage.label, record=context.url,
        params={"stage": _describe(stage)}, tags={"pneumo.stage": stage.name},
    )(context)  # fmt: skip
    seconds = time.perf_counter() - started
    record = {"stage": stage.name, "label": stage.label, "seconds": seconds, "result": result}
    _put_json(store, f"{stage.path}/{DONE_FILE}", record)  # last: this commits the stage
    log.info("%s done in %.1f s: %s", stage.label, seconds, stage.name)
    return StageOutcome(status="resume" if interrupted else "run", record=record)


def read_done(store: Store, stage: Stage) -> dict[str, Any]:
    """The ``done.json`` record of a finished stage."""
    record: dict[str, Any] = json.loads(store.get(f"{stage.path}/{DONE_FILE}"))
    return record


@dataclass(kw_only=True)
class StageRunner:
    """Runs stages in dependency order under ``EXP``, skipping done ones.

    :meth:`run_all` runs them one after another in this process;
    ``pneumo.experiment.executors.run_stages`` runs the independent ones at the same time
    through the same :meth:`job`, :func:`execute_stage` and :meth:`finish`.

    ``progress`` gets ``{"event": "stage", "status": "skip"|"run"|"resume"|"done", "index",
    "total", "label", "name", "seconds", "result"}`` per stage, and the stage's own progress
    dicts with ``"event": "step"`` and the stage's ``label`` added.
    """

    exp: str
    dataset: str
    functions: Mapping[str, StageFunction]
    resume: str = "auto"
    progress: Progress | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> result
    # stage name -> {"status": "skip"|"run"|"resume", "seconds": of the run that did it}
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resume not in RESUME_MODES:
            raise ConfigError(f"--resume {self.resume!r}: use one of {', '.join(RESUME_MODES)}")
        self.store: Store = open_store(self.exp)

    def url(self, stage: Stage) -> str:
        return self.store.url_of(stage.path)

    def is_done(self, stage: Stage) -> bool:
        return self.store.exists(f"{stage.path}/{DONE_FILE}")

    def run_all(self, stages: list[Stage]) -> dict[str, dict[str, Any]]:
        """Run (or skip) every stage in order; returns ``{stage name: result}``."""
        for index, stage in enumerate(stages, 1):
            self.run(stage, index=index, total=len(stages))
        return self.results

    def run(self, stage: Stage, *, index: int = 1, total: int = 1) -> dict[str, Any]:
        """The stage's result: read from its ``done.json``, or computed and recorded."""
        if self.skip_if_done(stage, index=index, total=total):
            return self.results[stage.name]
        job = self.job(stage, index=index, total=total)
        self.emit_start(job)
        outcome = execute_stage(job, self._forward(job))
        return self.finish(job, outcome)

    def skip_if_done(self, stage: Stage, *, index: int, total: int) -> bool:
        """Take the result of a stage found done (and say so); False if it is not done."""
        if not self.is_done(stage):
            return False
        record = read_done(self.store, stage)
        self.results[stage.name] = record["result"]
        self.outcomes[stage.name] = {"status": "skip", "seconds": record.get("seconds")}
        self._emit({**self._event(stage, index, total), "status": "skip",
                    "seconds": record.get("seconds"), "result": record["result"]})  # fmt: skip
        return True

    def job(self, stage: Stage, *, index: int = 1, total: int = 1) -> StageJob:
        """What running ``stage`` takes, once its inputs have results."""
        missing = [s.label for _, s in stage.inputs if s.name not in self.results]
        if missing:  # a plan out of order is a bug of ours, not of the user's
            raise RuntimeError(f"{stage.label}: inputs not run yet: {missing}")
        return StageJob(
            exp=self.exp,
            dataset=self.dataset,
            stage=stage,
            function=self.functions[stage.kind],
            inputs={role: self.results[s.name] for role, s in stage.inputs},
            input_urls={role: self.url(s) for role, s in stage.inputs},
            resume=self.resume,
            index=index,
            total=total,
            tracking=tracking.active(),
        )

    def emit_start(self, job: StageJob) -> None:
        """The ``run`` (or ``resume``: its folder holds an interrupted attempt) event."""
        interrupted = self.store.exists(f"{job.stage.path}/{STAGE_FILE}")
        status = "resume" if interrupted and job.resume == "auto" else "run"
        self._emit({**self._event(job.stage, job.index, job.total), "status": status})

    def finish(self, job: StageJob, outcome: StageOutcome) -> dict[str, Any]:
        """Record a job's outcome (its ``done.json`` already written) and say so."""
        stage, record = job.stage, outcome.record
        self.results[stage.name] = record["result"]
        self.outcomes[stage.name] = {"status": outcome.status, "seconds": record["seconds"]}
        event = self._event(stage, job.index, job.total)
        self._emit({**event, "status": "done", "seconds": record["seconds"],
                    "result": record["result"]})  # fmt: skip
        return record["result"]  # type: ignore[no-any-return]

    def step_event(self, job: StageJob, p: dict[str, Any]) -> None:
        """A stage's own progress dict, passed on as a ``step`` event."""
        self._emit({**p, "event": "step", "label": job.stage.label, "index": job.index})

    def _forward(self, job: StageJob) -> Progress | None:
        if self.progress is None:
            return None
        return lambda p: self.step_event(job, p)

    @staticmethod
    def _event(stage: Stage, index: int, total: int) -> dict[str, Any]:
        return {"event": "stage", "index": index, "total": total, "label": stage.label,
                "name": stage.name}  # fmt: skip

    def _emit(self, event: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(event)


def _describe(stage: Stage) -> dict[str, Any]:
    return {
        "format": STAGE_FORMAT,
        "name": stage.name,
        "kind": stage.kind,
        "label": stage.label,
        "digest": stage.digest,
        "settings": stage.settings,
        "inputs": {role: s.name for role, s in stage.inputs},
    }


def _put_json(store: Store, path: str, obj: Any) -> None:
    store.put(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
