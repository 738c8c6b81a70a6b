"""MLflow tracking of trainings, evaluations and experiments (the optional ``pneumo[tracking]``).

Off unless asked: the CLI's edge turns ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` into a
:class:`TrackingConfig` and :func:`configure` makes it the active one; with none active every
function here does nothing and ``mlflow`` is never imported. With one:

* a training (:func:`pneumo.training.tracked.training_run`, called by
  :func:`pneumo.training.loop.run` on rank 0) is a run: its config flattened as parameters,
  every ``metrics.jsonl`` field at ``step = epoch``, ``curves.png`` each epoch and
  ``config.json``, ``metrics.jsonl``, ``postprocess.json`` at the end as artifacts, the
  data's identity as tags (dataset URL, Delta table version, the pinned rows' fingerprints,
  the init chain). Its run id is recorded in ``RUN/tracking.json``, so a resumed training
  continues the same run;
* an evaluation (:func:`pneumo.training.tracked.record_evaluation`) is a run of its
  settings, summary and files;
* an experiment is a run (``EXP/tracking.json``) and each stage a run nested under it
  (:func:`nested`: a picklable call, so a stage may run in another process or on a Ray
  worker); the training or evaluation inside a stage logs into the stage's run.

This module is the tracking itself: its settings and activation, a run (:class:`Tracked`;
:class:`MlflowRun`), opening one (:func:`open_run`) and nesting runs (:func:`parent`,
:func:`nested`). What a training and an evaluation log is :mod:`pneumo.training.tracked`'s.

A tracking failure (server down, database locked) never stops the work: the run warns once
and goes quiet. Credentials in a tracking URI never reach a log line (:func:`redact`).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pneumo.shards.errors import ConfigError
from pneumo.shards.store import Store, open_store

log = logging.getLogger(__name__)

RECORD_FILE = "tracking.json"  # in a RUN or EXP folder: the MLflow run it logs to
DEFAULT_EXPERIMENT = "pneumo"
INSTALL = "pip install 'pneumo[tracking]'"
_MAX_PARAM = 6000  # MLflow's longest parameter value
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str, uri: str | None = None) -> str:
    """``text`` with the user and password of every ``scheme://user:pass@host`` hidden (and
    ``uri``'s password wherever else it appears, e.g. quoted by an error message)."""
    password = _USERINFO.search(uri or "")
    if password and ":" in password.group(0):
        secret = password.group(0)[:-1].split(":", 1)[1]
        text = text.replace(secret, "***") if secret else text
    return _USERINFO.sub("***@", text)


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Where runs go.

    Attributes:
        uri: the MLflow tracking URI (``sqlite:///path/mlflow.db``, ``http://host:5000``...).
        experiment: the MLflow experiment new runs go into.
        parent_run_id: new runs are nested under this run.
        run_id: log into this run (a stage's) rather than open one; it is not ended here.
    """

    uri: str = field(repr=False)
    experiment: str = DEFAULT_EXPERIMENT
    parent_run_id: str | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        if not self.uri.strip():
            raise ConfigError("--tracking-uri is empty: give an MLflow tracking URI")

    def __repr__(self) -> str:
        return f"TrackingConfig(uri={redact(self.uri, self.uri)!r}, experiment={self.experiment!r})"

    @classmethod
    def from_env(
        cls, uri: str | None = None, environ: Mapping[str, str] = os.environ
    ) -> TrackingConfig | None:
        """``uri`` (the ``--tracking-uri`` option) or ``MLFLOW_TRACKING_URI``, with
        ``MLFLOW_EXPERIMENT_NAME`` and ``MLFLOW_PARENT_RUN_ID``; None: no tracking."""
        uri = uri or environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            return None
        return cls(
            uri=uri,
            experiment=environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
            parent_run_id=environ.get("MLFLOW_PARENT_RUN_ID") or None,
        )


_ACTIVE: contextvars.ContextVar[TrackingConfig | None] = contextvars.ContextVar(
    "pneumo_tracking", default=None
)


def require_mlflow() -> None:
    """Raise the one-line ConfigError that says how to install MLflow, if it is missing."""
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"tracking needs MLflow, which is not installed: {INSTALL}")


def configure(cfg: TrackingConfig | None) -> None:
    """Make ``cfg`` this process's tracking (None: none). The CLI calls this once."""
    if cfg is not None:
        require_mlflow()
        if cfg.uri.startswith(("http://", "https://")):
            # MLflow's defaults (7 retries, 120 s each, with backoff) hold a training at its
            # start for minutes when the server is down; tracking must not. A value the
            # user set wins; child processes (stages) inherit these.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    _ACTIVE.set(cfg)


def active() -> TrackingConfig | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def activated(cfg: TrackingConfig | None) -> Iterator[None]:
    """``cfg`` active inside the block (in this thread), the one before after it."""
    token = _ACTIVE.set(cfg)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# --- one run ----------------------------------------------------------------------------


class Tracked:
    """A run this process logs to; this base class is the no-op of "not tracked".

    ``log_params``: flattened (``a.b``), a name the run has keeps its first value (a resume);
    ``log_metrics``: the numbers of a dict; ``log_new_metrics``: those the run has no metric
    of yet; ``log_history``: ``metrics.jsonl`` lines at ``step = epoch`` when the run has no
    metric (a resume of a run not tracked before); ``log_files``: the files among ``paths``
    that ``store`` holds, under their folder.
    """

    id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_metrics(self, values: Mapping[str, Any], step: int | None = None) -> None: ...
    def log_new_metrics(self, values: Mapping[str, Any]) -> None: ...
    def log_history(self, rows: Sequence[Mapping[str, Any]]) -> None: ...
    def log_files(self, store: Store, paths: Sequence[str]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...

    def __enter__(self) -> Tracked:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        if kind is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


NOT_TRACKED = Tracked()


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """A failure of the tracking store warns once and silences the run; the work goes on."""

    def call(self: MlflowRun, *args: Any, **kwargs: Any) -> None:
        if self.broken:
            return
        try:
            method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the store: warn, go on
            self.broken = True
            _warn(self.uri, e)

    return call


class MlflowRun(Tracked):
    def __init__(self, client: Any, run_id: str, *, uri: str, owned: bool) -> None:
        self.client, self.id, self.uri, self.owned = client, run_id, uri, owned
        self.broken = False

    @_guarded
    def log_params(self, params: Mapping[str, Any]) -> None:
        have = self.client.get_run(self.id).data.params
        new = {k: v for k, v in flatten(params).items() if k not in have}
        self._batch(params=[_entity("Param", k, v) for k, v in new.items()])

    @_guarded
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        clean = {k: str(v)[:_MAX_PARAM] for k, v in tags.items() if v is not None}
        self._batch(tags=[_entity("RunTag", k, v) for k, v in clean.items()])

    @_guarded
    def log_metrics(self, values: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        found = numbers(values).items()
        self._batch(metrics=[Metric(k, v, now, step or 0) for k, v in found])

    @_guarded
    def log_new_metrics(self, values: Mapping[str, Any]) -> None:
        have = self.client.get_run(self.id).data.metrics
        MlflowRun.log_metrics(self, {k: v for k, v in values.items() if k not in have})

    @_guarded
    def log_history(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows and not self.client.get_run(self.id).data.metrics:
            for row in rows:
                MlflowRun.log_metrics(self, row, step=int(row["epoch"]))

    @_guarded
    def log_files(self, store: Store, paths: Sequence[str]) -> None:
        with tempfile.TemporaryDirectory(prefix="pneumo-tracking-") as tmp:
            for path in paths:
                if not store.exists(path):
                    continue
                local = Path(tmp, path)
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(store.get(path))
                folder = path.rsplit("/", 1)[0] if "/" in path else None
                self.client.log_artifact(self.id, str(local), artifact_path=folder)

    def end(self, status: str = "FINISHED") -> None:
        if self.owned:
            _guarded(lambda run: run.client.set_terminated(run.id, status))(self)

    def _batch(self, **entities: list[Any]) -> None:
        size = 1000 if "metrics" in entities else 100  # MLflow's most per batch
        for key, items in entities.items():
            for start in range(0, len(items), size):
                self.client.log_batch(self.id, **{key: items[start : start + size]})


def _entity(kind: str, key: str, value: str) -> Any:
    from mlflow import entities

    return getattr(entities, kind)(key, value)


_warned: set[str] = set()


def _warn(uri: str, error: BaseException) -> None:
    """One warning per tracking URI and process, without its credentials."""
    if uri in _warned:
        return
    _warned.add(uri)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    log.warning(
        "MLflow tracking at %s failed (%s); going on without tracking",
        redact(uri, uri), redact(text[:300], uri),
    )  # fmt: skip


def open_run(
    *, name: str, record: Store | None = None, tags: Mapping[str, Any] | None = None
) -> Tracked:
    """The active tracking's run for this work: the given ``run_id``, the one ``record``
    names (``tracking.json``: a resumed run), or a new one (nested under ``parent_run_id``);
    NOT_TRACKED without active tracking or when the store fails (warned once; later runs
    of this process do not try again: MLflow retries a server that is down for minutes)."""
    cfg = active()
    if cfg is None or cfg.uri in _warned:  # off, or failed before in this process
        return NOT_TRACKED
    require_mlflow()
    try:
        run = _open(cfg, name, record)
    except Exception as e:  # noqa: BLE001 - the store is down or refuses: warn, go on
        _warn(cfg.uri, e)
        return NOT_TRACKED
    run.set_tags(tags or {})
    return run


def _open(cfg: TrackingConfig, name: str, record: Store | None) -> MlflowRun:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.uri)
    if cfg.run_id:
        return MlflowRun(client, cfg.run_id, uri=cfg.uri, owned=False)
    known = json.loads(record.get(RECORD_FILE)) if record and record.exists(RECORD_FILE) else {}
    if known.get("tracking_uri") == redact(cfg.uri, cfg.uri) and known.get("run_id"):
        client.get_run(known["run_id"])  # raises when that store does not hold it
        client.update_run(known["run_id"], status="RUNNING")
        log.info("continuing MLflow run %s", known["run_id"])
        return MlflowRun(client, known["run_id"], uri=cfg.uri, owned=True)
    tags = {"mlflow.parentRunId": cfg.parent_run_id} if cfg.parent_run_id else {}
    run = client.create_run(_experiment_id(client, cfg), run_name=name, tags=tags)
    if record is not None:
        text = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                "tracking_uri": redact(cfg.uri, cfg.uri)}  # fmt: skip
        record.put(RECORD_FILE, (json.dumps(text, indent=2, sort_keys=True) + "\n").encode())
    return MlflowRun(client, run.info.run_id, uri=cfg.uri, owned=True)


def _experiment_id(client: Any, cfg: TrackingConfig) -> str:
    """The experiment's id, created if new (a sqlite store keeps its artifacts beside the
    database, not in the current folder)."""
    found = client.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if cfg.uri.startswith("sqlite:///"):
        location = (Path(cfg.uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    try:
        return str(client.create_experiment(cfg.experiment, artifact_location=location))
    except Exception:  # another process created it first
        found = client.get_experiment_by_name(cfg.experiment)
        if found is None:
            raise
        return str(found.experiment_id)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": "1", "c": "[1, 2]"}`` (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(value, default=str)[:_MAX_PARAM]
        else:
            out[name] = str(value)[:_MAX_PARAM]
    return out


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The int and float values of ``values`` (NaN kept: MLflow stores it)."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


@contextlib.contextmanager
def parent(run: Tracked) -> Iterator[None]:
    """Runs opened inside the block (the experiment's stages) are nested under ``run``."""
    cfg = active()
    with activated(replace(cfg, parent_run_id=run.id) if cfg and run.id else cfg):
        yield


@dataclass(frozen=True, kw_only=True)
class NestedRun:
    """``fn(*args)`` inside a run nested under the active parent, which the libraries it
    calls log into; picklable (when ``fn`` is), so it may run in another process."""

    fn: Callable[..., Any]
    config: TrackingConfig
    name: str
    record: str  # the URL of the folder whose tracking.json names the run (resume)
    params: Mapping[str, Any]
    tags: Mapping[str, Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with activated(self.config):
            record = open_store(self.record)
            with open_run(name=self.name, record=record, tags=self.tags) as run:
                run.log_params(self.params)
                with activated(replace(self.config, run_id=run.id) if run.id else None):
                    result = self.fn(*args, **kwargs)
                if isinstance(result, Mapping):
                    run.log_new_metrics(result)
        return result


def nested(
    fn: Callable[..., Any], config: TrackingConfig | None, *, name: str, record: str,
    params: Mapping[str, Any], tags: Mapping[str, Any],
) -> Callable[..., Any]:  # fmt: skip
    """``fn`` as a run nested under ``config``'s parent (:class:`NestedRun`): ``config`` is
    the tracking active where the work was planned, carried to the process that runs it
    (None: ``fn`` itself, nothing tracked)."""
    if config is None:
        return fn
    return NestedRun(fn=fn, config=config, name=name, record=record, params=params, tags=tags)
