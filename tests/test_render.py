"""The CLI's error wrapper: one line and the right exit code, also when Ctrl-C kills a worker."""

from __future__ import annotations

import signal

import pytest
import typer

from pneumo.render import fail_on_errors
from pneumo.shards.errors import PneumoError


def train_segment_cmd(error: Exception) -> None:
    """What a training command sees when Ctrl-C reaches a DataLoader worker before it
    ignores SIGINT: the signal arrives, and the loader fails with its own error first.
    (The name gives the interruption line its command.)"""
    try:
        # To this thread (os.kill may hand it to another of the suite's threads, and
        # Python would run its handler later): the handler runs before the next line.
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        raise error from None


@pytest.fixture
def python_sigint():
    """SIGINT handled by Python, as in a command run from a terminal. The suite itself may
    have started with SIGINT ignored (a background job of a non-interactive shell, as CI
    can be), and then Python installs no handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_loader_failure_after_ctrl_c_is_the_interruption(capsys, python_sigint):
    wrapped = fail_on_errors(train_segment_cmd)
    with pytest.raises(typer.Exit) as stopped:
        wrapped(RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly"))
    assert stopped.value.exit_code == 130
    assert capsys.readouterr().err.strip() == (
        "interrupted: pneumo train segment stopped; run the same command again to resume it"
    )
    # The wrapper gives Python's own handler back.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_same_failure_without_ctrl_c_is_not_hidden(python_sigint):
    def train_segment_cmd() -> None:
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        fail_on_errors(train_segment_cmd)()


def test_our_errors_are_one_line_with_exit_code_1(capsys):
    def ingest_siim_cmd() -> None:
        raise PneumoError("labels.csv row 3: bad RLE")

    with pytest.raises(typer.Exit) as stopped:
        fail_on_errors(ingest_siim_cmd)()
    assert stopped.value.exit_code == 1
    assert capsys.readouterr().err.strip() == "error: labels.csv row 3: bad RLE"


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        seen = []

        def train_segment_cmd() -> None:
            seen.append(signal.getsignal(signal.SIGINT))

        fail_on_errors(train_segment_cmd)()
        assert seen == [signal.SIG_IGN]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
