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

from pneumo.shards.errors import ConfigError
from pneumo.shards.store import Store, open_store

log = logging.getLogger(__name__)

STAGE_FORMAT = "pneumo.stage/1"  # bump to invalidate every stage of older experiments
STAGE_FILE = "stage.json"
DONE_FILE = "done.json"
RESUME_MODES = ("auto", "never")

Progress = Callable[[dict[str, Any]], None]


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


@dataclass(kw_only=True)
class StageRunner:
    """Runs stages in dependency order under ``EXP``, skipping done ones.

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
        event = {"event": "stage", "index": index, "total": total, "label": stage.label}
        event["name"] = stage.name
        if self.is_done(stage):
            record = json.loads(self.store.get(f"{stage.path}/{DONE_FILE}"))
            self.results[stage.name] = record["result"]
            self.outcomes[stage.name] = {"status": "skip", "seconds": record.get("seconds")}
            self._emit({**event, "status": "skip", "seconds": record.get("seconds"),
                        "result": record["result"]})  # fmt: skip
            return record["result"]
        missing = [s.label for _, s in stage.inputs if s.name not in self.results]
        if missing:  # a plan out of order is a bug of ours, not of the user's
            raise RuntimeError(f"{stage.label}: inputs not run yet: {missing}")
        interrupted = self.store.exists(f"{stage.path}/{STAGE_FILE}")
        if interrupted and self.resume == "never":
            for path in self.store.list(stage.path):
                self.store.delete(path)
            interrupted = False
        self._put_json(f"{stage.path}/{STAGE_FILE}", self._describe(stage))
        self._emit({**event, "status": "resume" if interrupted else "run"})
        started = time.perf_counter()
        result = self.functions[stage.kind](self._context(stage, event))
        seconds = time.perf_counter() - started
        record = {"stage": stage.name, "label": stage.label, "seconds": seconds, "result": result}
        self._put_json(f"{stage.path}/{DONE_FILE}", record)  # last: this commits the stage
        self.results[stage.name] = result
        status = "resume" if interrupted else "run"
        self.outcomes[stage.name] = {"status": status, "seconds": seconds}
        self._emit({**event, "status": "done", "seconds": seconds, "result": result})
        log.info("%s done in %.1f s: %s", stage.label, seconds, stage.name)
        return result

    def _context(self, stage: Stage, event: dict[str, Any]) -> StageContext:
        def forward(p: dict[str, Any]) -> None:
            self._emit({**p, "event": "step", "label": stage.label, "index": event["index"]})

        return StageContext(
            stage=stage,
            dataset=self.dataset,
            url=self.url(stage),
            inputs={role: self.results[s.name] for role, s in stage.inputs},
            input_urls={role: self.url(s) for role, s in stage.inputs},
            progress=forward if self.progress else None,
        )

    def _describe(self, stage: Stage) -> dict[str, Any]:
        return {
            "format": STAGE_FORMAT,
            "name": stage.name,
            "kind": stage.kind,
            "label": stage.label,
            "digest": stage.digest,
            "settings": stage.settings,
            "inputs": {role: s.name for role, s in stage.inputs},
        }

    def _put_json(self, path: str, obj: Any) -> None:
        self.store.put(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def _emit(self, event: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(event)
