"""The Ray executor: each stage a Ray task, on the cluster ``RAY_ADDRESS`` names (Ray reads
it) or on a local Ray started for the run.

A stage that runs a model asks for one GPU when the cluster has GPUs; every stage asks for
CPUs for itself and its loader workers (``1 + workers`` of its settings, at most a node's
CPUs per GPU, so the GPUs decide how many stages a node runs). Ray queues what the cluster
cannot place yet, and reruns a task lost with its node (``max_retries``): it resumes from
the stage's folder like any interrupted stage. Before the first stage, every node must read
EXP and DATASET (``s3://``, or a filesystem mounted at the same path everywhere).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import Any

from pneumo.experiment.executors import TORCH_KINDS, Finished, describe_error
from pneumo.experiment.stages import StageJob, StageOutcome, execute_stage
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import open_store

log = logging.getLogger(__name__)

PROBE_FILE = "executor.json"  # written into EXP, read back on every node


def _run_in_ray(job: StageJob, threads: int) -> StageOutcome:
    """A Ray task: one stage, with ``threads`` torch threads."""
    if job.stage.kind in TORCH_KINDS:
        import torch

        torch.set_num_threads(threads)
    return execute_stage(job)


def _probe(exp: str, dataset: str, nonce: str) -> tuple[str, str | None]:
    """On one node: its name, and why it cannot read EXP or DATASET (None: it can)."""
    from pneumo.shards.manifest import require_dataset

    try:
        found = json.loads(open_store(exp, create=False).get(PROBE_FILE)).get("nonce")
        if found != nonce:
            return socket.gethostname(), f"EXP {exp} there is another folder"
        require_dataset(open_store(dataset, create=False))
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return socket.gethostname(), str(e).splitlines()[0] if str(e) else type(e).__name__
    return socket.gethostname(), None


class RayExecutor:
    """Each stage a Ray task (see the module's notes). Uses the Ray this process already
    joined if there is one (and leaves it running), else joins or starts one for the run."""

    max_retries = 3

    def __init__(self, *, exp: str, dataset: str, grace_s: float = 120.0) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'pneumo[ray]'") from None
        self.ray, self.grace_s = ray, grace_s
        self.started = not ray.is_initialized()
        if self.started:
            where = os.environ.get("RAY_ADDRESS") or "a local Ray"
            try:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
            except SystemExit:  # what Ray does when RAY_ADDRESS names no reachable cluster
                raise ConfigError(f"--executor ray: no Ray cluster answers at {where}") from None
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"--executor ray: cannot join {where}: {e}") from e
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            self.gpus = sum(n["Resources"].get("GPU", 0) for n in nodes) >= 1
            self.node_cpus = _cpus_per_stage_limit(nodes, gpus=self.gpus)
            self._check_storage(nodes, exp, dataset)
        except BaseException:
            self.close()
            raise
        self.task = ray.remote(_run_in_ray)
        self.running: dict[Any, StageJob] = {}
        log.info("Ray: %d nodes, %s", len(nodes), "GPUs" if self.gpus else "CPUs only")

    def _check_storage(self, nodes: list[dict[str, Any]], exp: str, dataset: str) -> None:
        """Every node reads EXP and DATASET, or the run stops before its first stage."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nonce = uuid.uuid4().hex
        record = {"executor": "ray", "nonce": nonce, "nodes": len(nodes)}
        open_store(exp).put(PROBE_FILE, (json.dumps(record) + "\n").encode())
        probe = self.ray.remote(_probe)
        refs = [
            probe.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(exp, dataset, nonce)
            for n in nodes
        ]
        for host, problem in self.ray.get(refs, timeout=300):
            if problem is not None:
                raise ConfigError(
                    f"Ray node {host} cannot read the experiment's data ({problem}): with "
                    "--executor ray, EXP and DATASET must be where every node reads them, an "
                    "s3:// prefix (AWS_* settings on every node) or a filesystem mounted at "
                    "the same path everywhere"
                )

    def free(self) -> int:
        return sys.maxsize  # Ray queues what the cluster cannot place yet

    def submit(self, job: StageJob) -> None:
        workers = int(job.stage.settings.get("workers") or 0)
        cpus = max(1.0, min(self.node_cpus, 1.0 + workers))  # the stage and its loaders
        options: dict[str, Any] = {"num_cpus": cpus, "name": job.stage.label,
                                   "max_retries": self.max_retries}  # fmt: skip
        if self.gpus and job.stage.kind in TORCH_KINDS:
            options["num_gpus"] = 1
        self.running[self.task.options(**options).remote(job, max(1, int(cpus)))] = job

    def wait(self, timeout: float | None = None) -> list[Finished]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # short waits: Ctrl-C is seen between them
            ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=1.0)
            if ready or (deadline is not None and time.monotonic() >= deadline):
                break
        ready, _ = self.ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
        return [self._result(ref) for ref in ready]

    def _result(self, ref: Any) -> Finished:
        from ray.exceptions import RayTaskError, TaskCancelledError

        job = self.running.pop(ref)
        try:
            return Finished(job=job, outcome=self.ray.get(ref))
        except TaskCancelledError as e:
            return Finished(job=job, error=e, detail="interrupted", interrupted=True)
        except RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else e
            line, _ = describe_error(cause)
            return Finished(job=job, error=cause, detail=line, trace=str(e))
        except Exception as e:  # noqa: BLE001 - a worker or node lost for good
            line, trace = describe_error(e)
            return Finished(job=job, error=e, detail=line, trace=trace)

    def interrupt(self) -> list[Finished]:
        for ref in self.running:
            self.ray.cancel(ref)  # KeyboardInterrupt in the task: training saves its place
        ended: list[Finished] = []
        deadline = time.monotonic() + self.grace_s
        try:
            while self.running and time.monotonic() < deadline:
                ended += self.wait(timeout=max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            pass
        for ref in list(self.running):
            self.ray.cancel(ref, force=True)
            log.warning("killed %s: it did not stop in time", self.running.pop(ref).stage.label)
        return ended

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def _cpus_per_stage_limit(nodes: list[dict[str, Any]], *, gpus: bool) -> float:
    """The most CPUs one stage may ask for: a node's CPUs, or its CPUs per GPU where there
    are GPUs (so the GPUs, not the CPU requests, decide how many stages a node runs)."""
    if gpus:
        shares = [
            n["Resources"].get("CPU", 0) / n["Resources"]["GPU"]
            for n in nodes
            if n["Resources"].get("GPU")
        ]
        return max(1.0, min(shares))
    return max(1.0, max(n["Resources"].get("CPU", 1) for n in nodes))
