"""The local executor: worker processes on this machine, one per slot (``--parallel N``:
N CPU slots; ``--devices cuda:0,cuda:1``: a slot per device).

Workers are started with ``spawn`` (forking a process that holds torch's threads is unsafe)
and live for the whole run, so torch is imported once per worker. A job goes to an idle
worker over its pipe; the worker sends back the stage's progress dicts, then its outcome or
its error. The first Ctrl-C or SIGTERM a worker gets raises KeyboardInterrupt in its stage
(a training stage saves its place), later ones are ignored; messages cross the pipes with
both signals blocked, so none is ever cut in half.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from pneumo.experiment.executors import TORCH_KINDS, ExecutorConfig, Finished, describe_error
from pneumo.experiment.stages import StageJob, execute_stage
from pneumo.shards.errors import ConfigError, PneumoError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Slot:
    """One stage at a time: on ``device``, with ``threads`` torch threads."""

    device: str
    threads: int
    env: dict[str, str] = field(default_factory=dict)


def local_slots(config: ExecutorConfig, cpus: int | None = None) -> list[Slot]:
    """The slots of ``config``: one per device, or ``parallel`` CPU slots.

    A CUDA slot's worker sees its GPU alone (``CUDA_VISIBLE_DEVICES``, mapped through the
    one this process was started with), so the stage's ``cuda:0`` is that GPU; a CPU slot's
    sees none.
    """
    if cpus is None:
        from pneumo.training.runs import available_cpus

        cpus = available_cpus()
    devices = config.devices or ("cpu",) * config.parallel
    threads = max(1, cpus // len(devices))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g.strip()] if visible is not None else None
    slots = []
    for device in devices:
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            n = int(device.split(":")[1])
            if gpus is not None and n >= len(gpus):
                raise ConfigError(f"--devices {device}: CUDA_VISIBLE_DEVICES shows {len(gpus)}")
            env["CUDA_VISIBLE_DEVICES"] = gpus[n] if gpus is not None else str(n)
        slots.append(Slot(device=device, threads=threads, env=env))
    return slots


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while a message crosses a pipe (half a message would leave
    the other end unable to read the next)."""
    stop = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop_on_signals() -> None:
    """In a worker: the first Ctrl-C or SIGTERM raises KeyboardInterrupt in the stage (a
    training stage saves its place), later ones are ignored (it is already stopping)."""
    seen: list[int] = []

    def stop(signum: int, frame: object) -> None:
        if not seen:
            seen.append(signum)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _worker_main(slot: Slot, conn: Connection) -> None:
    """A worker process: runs the jobs it is sent, one at a time, until told to stop."""
    os.environ.update(slot.env)
    _stop_on_signals()

    def send(*message: Any) -> None:
        with _signals_blocked():
            conn.send(message)

    while True:
        try:
            job = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if job is None:
            return
        try:
            if job.stage.kind in TORCH_KINDS:
                import torch

                torch.set_num_threads(slot.threads)
            outcome = execute_stage(job, lambda p: send("step", p))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
            line, trace = describe_error(e)
            send("error", _picklable(e, line), line, trace, isinstance(e, KeyboardInterrupt))
            if isinstance(e, KeyboardInterrupt):
                return
            continue
        send("done", outcome)


def _picklable(e: BaseException, line: str) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - an exception class that does not pickle
        return PneumoError(line) if isinstance(e, PneumoError) else RuntimeError(line)


class _Worker:
    def __init__(self, slot: Slot, context: Any) -> None:
        self.slot = slot
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main, args=(slot, child), name=f"pneumo-stage-{slot.device}"
        )
        self.process.start()
        child.close()
        self.job: StageJob | None = None


class LocalExecutor:
    """Worker processes on this machine, one per :class:`Slot` (see the module's notes);
    ``on_step`` gets each job's progress dicts."""

    def __init__(
        self,
        slots: list[Slot],
        *,
        on_step: Callable[[StageJob, dict[str, Any]], None] | None = None,
        grace_s: float = 120.0,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.on_step, self.grace_s = on_step, grace_s
        self.workers = [_Worker(slot, context) for slot in slots]
        log.info("%d stage workers: %s", len(slots), ", ".join(s.device for s in slots))

    def free(self) -> int:
        return sum(w.job is None for w in self.workers)

    def submit(self, job: StageJob) -> None:
        worker = next(w for w in self.workers if w.job is None)
        with _signals_blocked():
            worker.conn.send(job)
        worker.job = job

    def wait(self, timeout: float | None = None) -> list[Finished]:
        busy = [w for w in self.workers if w.job is not None]
        while True:
            woke = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout)
            ended = [f for w in busy if (f := self._poll(w, dead=w.process.sentinel in woke))]
            if ended or timeout is not None:
                return ended

    def _poll(self, worker: _Worker, *, dead: bool) -> Finished | None:
        """The worker's messages so far: step events go on, an end is returned."""
        job = worker.job
        assert job is not None
        while worker.conn.poll():
            try:
                with _signals_blocked():
                    kind, *body = worker.conn.recv()
            except (EOFError, OSError):
                break
            if kind == "step":
                if self.on_step is not None:
                    self.on_step(job, body[0])
                continue
            worker.job = None
            if kind == "done":
                return Finished(job=job, outcome=body[0])
            error, line, trace, interrupted = body
            return Finished(job=job, error=error, detail=line, trace=trace, interrupted=interrupted)
        if dead or not worker.process.is_alive():
            worker.job = None
            code = worker.process.exitcode
            line = f"its worker process on {worker.slot.device} died (exit code {code})"
            return Finished(job=job, error=RuntimeError(line), detail=line)
        return None

    def interrupt(self) -> list[Finished]:
        busy = [w for w in self.workers if w.job is not None]
        for worker in busy:
            if worker.process.pid is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGTERM)
        ended: list[Finished] = []
        deadline = time.monotonic() + self.grace_s
        try:
            while any(w.job is not None for w in busy) and time.monotonic() < deadline:
                ended += self.wait(timeout=max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            pass
        for worker in busy:
            if worker.job is not None:
                worker.process.kill()
                log.warning("killed %s: it did not stop in time", worker.job.stage.label)
                worker.job = None
        return ended

    def close(self) -> None:
        for worker in self.workers:
            if worker.job is None and worker.process.is_alive():
                try:
                    with _signals_blocked():
                        worker.conn.send(None)
                except OSError:
                    pass
        for worker in self.workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
