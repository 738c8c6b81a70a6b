"""What a training and an evaluation log to MLflow, when tracking is on.

The tracking itself (settings, activation, a run, opening and nesting runs) is
:mod:`pneumo.training.tracking`; this module is two of its users, which share what they say
of the data (:func:`_identity`): a training (:func:`training_run`, called by
:func:`pneumo.training.loop.run` on rank 0) and an evaluation (:func:`record_evaluation`).
With no tracking active both do nothing, and ``mlflow`` is never imported.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pneumo.shards.store import open_store
from pneumo.training.tracking import NOT_TRACKED, RECORD_FILE, Tracked, active, open_run

if TYPE_CHECKING:
    from pneumo.training.job import Job

# The RUN files a training logs as artifacts at its end (curves.png also every epoch).
TRAINING_FILES = ("config.json", "metrics.jsonl", "curves.png", "postprocess.json")


def dataset_version(dataset: str) -> int | None:
    """The Delta table version of ``dataset``'s manifest now (None: no Delta table)."""
    from pneumo.shards import manifest

    table = manifest.open_table(open_store(dataset, create=False))
    return None if table is None else int(table.version())


class TrainingRun:
    """What the loop tells the tracking: :func:`training_run` makes it."""

    def __init__(self, job: Job, run: Tracked) -> None:
        self.job, self.run = job, run

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.run.__exit__(*exc)

    def epoch(self, row: Mapping[str, Any]) -> None:
        """An epoch's ``metrics.jsonl`` line and the curves drawn with it."""
        self.run.log_metrics(row, step=int(row["epoch"]))
        self.run.log_files(self.job.run.store, ["curves.png"])

    def finish(self, result: Mapping[str, Any]) -> None:
        """The figures of the end (best score, post-processing) and the RUN's files."""
        self.run.log_new_metrics(result)
        self.run.log_files(self.job.run.store, TRAINING_FILES)


def training_run(job: Job) -> TrainingRun:
    """The run of a training (rank 0 only; NOT_TRACKED elsewhere or without tracking)."""
    if active() is None or not job.env.is_main:
        return TrainingRun(job, NOT_TRACKED)
    from pneumo.training.checkpoint import init_line

    meta = job.meta
    name = job.run.url.rstrip("/").rsplit("/", 1)[-1]
    run = open_run(name=name, record=job.run.store, tags={"pneumo.kind": "training"})
    about = {k: v for k, v in meta.items() if k not in ("config", "layouts", "init")}
    run.log_params({**meta["config"], **about})
    # The Delta version when the rows were pinned: a resume keeps the tag of its start.
    run.set_tags(_identity(job.cfg.dataset, meta.get("fingerprints", {}), job.step == 0) | {
        "pneumo.task": job.task.name, "pneumo.run": job.run.url,
        "pneumo.init": init_line(meta.get("init", [])),
    })  # fmt: skip
    run.log_history(job.history)  # a resumed run that was not tracked before
    return TrainingRun(job, run)


def _identity(
    dataset: str, fingerprints: Mapping[str, Any], version: bool = True
) -> dict[str, Any]:
    """The data a run used: the dataset, its Delta version now, the selections' hashes."""
    tags: dict[str, Any] = {"pneumo.dataset": dataset}
    with contextlib.suppress(Exception):  # a legacy or unreachable manifest: no version
        tags["pneumo.dataset_version"] = dataset_version(dataset) if version else None
    for name, value in fingerprints.items():
        tags[f"pneumo.fingerprint.{name}"] = value
    return tags


def record_evaluation(
    run: str, split: str, config: Mapping[str, Any], summary: Mapping[str, Any]
) -> None:
    """An evaluation of RUN as a run: its settings, its summary's figures, its files
    (``RUN/eval/<split>.json`` and ``-*.png``), the fingerprint of the rows its ``where``
    selects in the dataset scored, and the trained run's MLflow id."""
    if active() is None:
        return
    from pneumo.shards import manifest
    from pneumo.training.data import select

    store = open_store(run, create=False)
    trained = json.loads(store.get(RECORD_FILE)) if store.exists(RECORD_FILE) else {}
    name = f"evaluate {run.rstrip('/').rsplit('/', 1)[-1]} {split}"
    tags = {"pneumo.kind": "evaluation", "pneumo.run": run,
            "pneumo.trained_run_id": trained.get("run_id")}  # fmt: skip
    files = [p for p in store.list("eval") if p == f"eval/{split}.json"
             or (p.startswith(f"eval/{split}-") and p.endswith(".png"))]  # fmt: skip
    with open_run(name=name, tags=tags) as tracked:
        tracked.log_params(config)
        dataset, fingerprints = str(summary["dataset"]), {}
        with contextlib.suppress(Exception):  # tracking never stops the work
            fingerprints["eval"] = manifest.fingerprint(select(dataset, summary["where"]))
        tracked.set_tags(_identity(dataset, fingerprints))
        tracked.log_metrics(summary)
        tracked.log_files(store, files)
