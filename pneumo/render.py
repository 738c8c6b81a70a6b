"""How the CLI shows things: progress bars, tables, and errors as one line."""

from __future__ import annotations

import contextlib
import functools
import logging
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


def fail_on_errors(fn: F) -> F:
    """Our own errors (and a missing file) become ``error: ...`` and exit code 1; Ctrl-C
    becomes one line saying what stopped and how to go on, and exit code 130.

    Ctrl-C goes to the whole process group: a DataLoader worker hit before it could ignore
    SIGINT dies, and the parent may then see "worker exited unexpectedly" (a RuntimeError)
    before its own KeyboardInterrupt. Any failure after a Ctrl-C is therefore the interruption.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _sigint_watch() as interrupted:
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                _interrupted(fn.__name__, "interrupted")
            except Exception as e:
                if interrupted():
                    _interrupted(fn.__name__, "failed after Ctrl-C")
                if not isinstance(e, (PneumoError, FileNotFoundError, PermissionError)):
                    raise
                if fail_on_errors.verbose:  # type: ignore[attr-defined]
                    logging.getLogger("pneumo").exception("failed")
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _interrupted(function_name: str, log_message: str) -> NoReturn:
    if fail_on_errors.verbose:  # type: ignore[attr-defined]
        logging.getLogger("pneumo").exception(log_message)
    typer.echo(interrupted_line(function_name), err=True)
    raise typer.Exit(130) from None


@contextlib.contextmanager
def _sigint_watch() -> Iterator[Callable[[], bool]]:
    """Note a SIGINT (then raise KeyboardInterrupt as Python does) while the body runs.

    Only where Python's own handler is installed, in the main thread: an ignored SIGINT
    (``nohup``, a background job) stays ignored, and a caller's handler is left alone.
    """
    seen: list[int] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield lambda: False
        return

    def note(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


fail_on_errors.verbose = False  # type: ignore[attr-defined]


def interrupted_line(function_name: str) -> str:
    """``ingest_siim_cmd`` -> the line printed when ``pneumo ingest siim`` is interrupted."""
    group, _, name = function_name.removesuffix("_cmd").partition("_")
    words = [group, name] if group in _GROUPS and name else [function_name.removesuffix("_cmd")]
    command = "pneumo " + " ".join(w.replace("_", "-") for w in words)
    if group in _RESUMABLE:
        return f"interrupted: {command} stopped; run the same command again to resume it"
    return f"interrupted: {command} stopped; run the same command again to redo it"


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
