"""Who is writing a batch: a lease per attempt, so two attempts never write one batch at once.

An attempt (a ``pneumo ingest`` process) takes a batch by creating the next lease file,
``batches/<dataset>-<batch>/lease-<generation>.json``, with a conditional put: of any
number of attempts racing for a generation, exactly one creates it. The lease names the
attempt, its host and process, and is rewritten every :data:`HEARTBEAT_S` seconds.

The highest generation holds the batch. Another attempt finds it

- *live* (its process runs on this host, or its heartbeat is recent): it refuses in one
  line, naming the holder;
- *dead* (its process is gone from this host, or no heartbeat for :data:`STALE_S`
  seconds): it takes the batch over by creating the next generation, and resumes from the
  chunks the dead attempt finished. Nothing the dead attempt wrote is deleted.

A holder that finds a higher generation (it stalled so long that another attempt took
over) stops before committing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pneumo.shards import layout
from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.store import Store

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 90.0  # no heartbeat for this long (another host): the attempt is dead
_LEASE = re.compile(r"lease-(\d{6})\.json$")


class LeaseLost(StoreError):
    """Another attempt took the batch over: this one must not commit."""


@dataclass(frozen=True, kw_only=True)
class Holder:
    attempt: str
    host: str
    pid: int
    heartbeat: float  # time.time() of the holder's last write
    ended: bool = False  # the attempt stopped on an error: nothing to wait for

    def alive(self, now: float) -> bool:
        if self.ended:
            return False
        if self.host == socket.gethostname():
            return _pid_alive(self.pid)
        return now - self.heartbeat < STALE_S

    def describe(self, now: float) -> str:
        return (
            f"attempt {self.attempt} (pid {self.pid} on {self.host}, "
            f"last seen {max(0.0, now - self.heartbeat):.0f} s ago)"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Lease:
    """This attempt's hold on a batch; a context manager that keeps it fresh."""

    def __init__(self, store: Store, dataset: str, batch: str) -> None:
        self.store, self.dataset, self.batch = store, dataset, batch
        self.attempt = secrets.token_hex(4)
        self.generation = -1
        self.previous: Holder | None = None  # the dead attempt this one took over from
        self._stop = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None

    def _path(self, generation: int) -> str:
        return layout.lease_path(self.dataset, self.batch, generation)

    def _body(self, *, ended: bool = False) -> bytes:
        return json.dumps(
            {
                "attempt": self.attempt,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "heartbeat": time.time(),
                "ended": ended,
            }
        ).encode()

    def acquire(self) -> Lease:
        """Take the batch, or take it over from a dead attempt.

        Raises:
            ConfigError: a live attempt holds it (one line naming it).
        """
        for _ in range(20):
            generation, holder = current(self.store, self.dataset, self.batch)
            now = time.time()
            if holder is not None and holder.alive(now):
                raise ConfigError(
                    f"batch {self.batch!r} of {self.dataset} is being written by "
                    f"{holder.describe(now)}: wait for it to finish, then run again"
                )
            if self.store.put_if_absent(self._path(generation + 1), self._body()):
                self.generation, self.previous = generation + 1, holder
                if holder is not None:
                    log.warning(
                        "batch %s: taking over from %s, which is gone",
                        self.batch,
                        holder.describe(now),
                    )
                return self
            time.sleep(0.05)  # another attempt created that generation first: look again
        raise ConfigError(f"batch {self.batch!r}: could not take its lease; run again")

    def __enter__(self) -> Lease:
        if self.generation < 0:
            self.acquire()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_beating()

    def _stop_beating(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.check()
                self.store.put(self._path(self.generation), self._body())
            except LeaseLost:
                self._lost = True
                return
            except Exception as e:  # a failed heartbeat is retried at the next beat
                log.warning("batch %s: lease heartbeat failed: %s", self.batch, e)

    def check(self) -> None:
        """Raises LeaseLost when another attempt took the batch over."""
        if self._lost or self.store.exists(self._path(self.generation + 1)):
            self._lost = True
            raise LeaseLost(
                f"batch {self.batch!r} of {self.dataset} was taken over by another attempt "
                "while this one stalled: this attempt stops without committing"
            )

    def end(self) -> None:
        """Mark the lease ended (this attempt stops on an error): a rerun takes over at
        once, from any host, without waiting for the heartbeat to go stale."""
        self._stop_beating()
        if self.generation >= 0 and not self._lost:
            try:
                self.store.put(self._path(self.generation), self._body(ended=True))
            except Exception as e:  # the store itself may be what failed
                log.info("batch %s: could not mark the lease ended: %s", self.batch, e)

    def release(self) -> None:
        """Delete every lease file of the batch (after its commit, or a drop)."""
        self._stop_beating()
        for path in self.store.list(layout.batch_progress_prefix(self.dataset, self.batch)):
            if _LEASE.search(path):
                self.store.delete(path)


def current(store: Store, dataset: str, batch: str) -> tuple[int, Holder | None]:
    """The highest lease generation of a batch and its holder (-1, None: no lease)."""
    found = []
    for path in store.list(layout.batch_progress_prefix(dataset, batch)):
        match = _LEASE.search(path)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        return -1, None
    generation, path = max(found)
    try:
        data: dict[str, Any] = json.loads(store.get(path))
        holder = Holder(
            attempt=str(data["attempt"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            heartbeat=float(data["heartbeat"]),
            ended=bool(data.get("ended", False)),
        )
    except (StoreError, ValueError, KeyError, TypeError):
        # Being written at this moment (local put is atomic, so: damaged): treat as dead
        # once old enough; a generation is never reused, so taking over is still safe.
        holder = Holder(attempt="?", host="?", pid=0, heartbeat=0.0)
    return generation, holder


def live_holder(store: Store, dataset: str, batch: str) -> Holder | None:
    """The live attempt writing a batch, if any (``batch drop`` refuses then)."""
    _, holder = current(store, dataset, batch)
    return holder if holder is not None and holder.alive(time.time()) else None
