"""How the CLI shows things: progress bars, tables, and errors as one line."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import re
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import IO, Any, NoReturn, TypeVar

import typer
from tqdm import tqdm

from pneumo.shards.errors import PneumoError

F = TypeVar("F", bound=Callable[..., Any])


class ProgressBar:
    """A tqdm bar on stderr (silent when stderr is not a terminal) fed by library callbacks."""

    def __init__(self, desc: str, *, unit: str = "it", total: int | None = None) -> None:
        self.bar = tqdm(desc=desc, unit=unit, total=total, disable=None, dynamic_ncols=True)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def update_to(self, done: int, total: int | None = None, **postfix: Any) -> None:
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)


# Commands whose rerun picks up where an interrupted run stopped: ingest rewrites only the
# uncommitted batch, training continues from the run's last checkpoint (--resume auto).
_RESUMABLE = ("ingest", "train")
_GROUPS = ("ingest", "train", "evaluate", "bench", "batch")  # sub-apps: `pneumo ingest siim`


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes eviction, preemption, ``kill``), raised where Python raises
    KeyboardInterrupt for Ctrl-C, so every ``finally`` and ``except KeyboardInterrupt`` runs
    for it the same way: temp files are removed, workers stopped, training saves its place."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def fail_on_errors(fn: F) -> F:
    """Our own errors (and a missing file, a full disk, an unreachable store) become
    ``error: ...`` and exit code 1; Ctrl-C and SIGTERM become one line saying what stopped
    and how to go on, and exit code 130 or 143 (128 + the signal, as a shell reports it).

    Ctrl-C goes to the whole process group: a DataLoader worker hit before it could ignore
    SIGINT dies, and the parent may then see "worker exited unexpectedly" (a RuntimeError)
    before its own KeyboardInterrupt. Any failure after Ctrl-C or SIGTERM is therefore the
    interruption.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _signal_watch() as signalled:
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt as e:
                seen = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
                _interrupted(fn.__name__, seen, "interrupted")
            except Exception as e:
                seen = signalled()
                if seen is not None:
                    _interrupted(fn.__name__, seen, "failed after the interruption")
                line = error_line(e)
                if line is None:
                    raise
                if fail_on_errors.verbose:  # type: ignore[attr-defined]
                    logging.getLogger("pneumo").exception("failed")
                typer.echo(f"error: {line}", err=True)
                raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _interrupted(function_name: str, signum: int, log_message: str) -> NoReturn:
    if fail_on_errors.verbose:  # type: ignore[attr-defined]
        logging.getLogger("pneumo").exception(log_message)
    typer.echo(interrupted_line(function_name, signum), err=True)
    raise typer.Exit(128 + signum) from None


@contextlib.contextmanager
def _signal_watch() -> Iterator[Callable[[], int | None]]:
    """Note a SIGINT or SIGTERM (then raise KeyboardInterrupt or :class:`Terminated`) while
    the body runs; yields a function giving the signal seen, if any.

    Only where the handler is Python's default (SIGINT) or the system's (SIGTERM), in the
    main thread: an ignored signal (``nohup``, a background job) stays ignored, and a
    caller's handler is left alone.
    """
    seen: list[int] = []
    # signal: (the handler a plain Python process has, the one that raises here)
    plain = {
        signal.SIGINT: (signal.default_int_handler, signal.default_int_handler),
        signal.SIGTERM: (signal.SIG_DFL, _raise_terminated),
    }
    main = threading.current_thread() is threading.main_thread()
    ours = {s: raises for s, (was, raises) in plain.items() if main and signal.getsignal(s) == was}

    def note(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        ours[signum](signum, frame)

    previous = {signum: signal.signal(signum, note) for signum in ours}
    try:
        yield lambda: seen[0] if seen else None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


fail_on_errors.verbose = False  # type: ignore[attr-defined]


# torch re-raises an error of a DataLoader worker in the training process with the worker's
# whole traceback as its message: "Caught StoreError in DataLoader worker process 0.\n
# Original Traceback (most recent call last): ..." (a RuntimeError when the error's class
# cannot be rebuilt from a message alone).
_WORKER_ERROR = re.compile(r"Caught (\w+) in [^\n]*\.\nOriginal Traceback")
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_STORE_CLIENT = "botocore.exceptions."  # boto3's errors: endpoint, credentials, timeouts


def error_line(e: BaseException) -> str | None:
    """The one line that explains ``e`` to a user, or None for a bug (shown in full).

    Explained: pneumo's own errors, also those raised inside a DataLoader worker (the
    worker's message, not torch's wrapper and its traceback); a missing or unreadable file;
    a full disk, naming the file that could not be written when the error does; an object
    store that cannot be reached or refuses the credentials.
    """
    worker = _worker_error(e)
    if worker is not None:
        kind, message = worker
        if kind.startswith("pneumo.") or kind in ("FileNotFoundError", "PermissionError"):
            return message
        return f"object store request failed: {message}" if kind.startswith(_STORE_CLIENT) else None
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        what = f": cannot write {e.filename}" if e.filename else ""
        return f"disk full{what} ({e.strerror}); free some space and run it again"
    if isinstance(e, (PneumoError, FileNotFoundError, PermissionError)):
        return str(e)
    if any(f"{c.__module__}." == _STORE_CLIENT for c in type(e).__mro__):
        return f"object store request failed: {e}"
    return None


def _worker_error(e: BaseException) -> tuple[str, str] | None:
    """``(class, message)`` of the original error when ``e`` is torch's re-raise of an
    error in a DataLoader worker; the class as the worker's traceback names it
    (``pneumo.shards.errors.StoreError``, ``ValueError``)."""
    text = str(e)
    found = _WORKER_ERROR.match(text)
    if found is None:
        return None
    name = found.group(1)
    lines = text.rstrip("\n").splitlines()
    for i in range(len(lines) - 1, 0, -1):  # the traceback's last exception: the one raised
        kind, sep, message = lines[i].partition(": ")
        if sep and (kind == name or kind.endswith("." + name)):
            return kind, " ".join([message, *(x.strip() for x in lines[i + 1 :])]).strip()
    return name, lines[-1].strip()


def interrupted_line(function_name: str, signum: int = signal.SIGINT) -> str:
    """``ingest_siim_cmd`` -> the line printed when ``pneumo ingest siim`` is interrupted
    (Ctrl-C) or terminated (SIGTERM)."""
    group, _, name = function_name.removesuffix("_cmd").partition("_")
    words = [group, name] if group in _GROUPS and name else [function_name.removesuffix("_cmd")]
    command = "pneumo " + " ".join(w.replace("_", "-") for w in words)
    how = "terminated" if signum == signal.SIGTERM else "interrupted"
    cause = " by SIGTERM" if signum == signal.SIGTERM else ""
    then = "resume" if group in _RESUMABLE else "redo"
    return f"{how}: {command} stopped{cause}; run the same command again to {then} it"


def print_table(table: Any, out: IO[str], max_width: int = 48) -> None:
    """A pyarrow table as aligned text columns."""
    names = table.column_names
    rows = [[_cell(v, max_width) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    out.write("  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip() + "\n")
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
    out.write(f"({table.num_rows} rows)\n")


def _cell(value: Any, max_width: int) -> str:
    text = (
        ""
        if value is None
        else (",".join(map(str, value)) if isinstance(value, list) else str(value))
    )
    return text if len(text) <= max_width else text[: max_width - 1] + "…"
