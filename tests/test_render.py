"""The CLI's error wrapper: one line and the right exit code, also when Ctrl-C kills a worker,
for SIGTERM, a full disk, and an error raised in a DataLoader worker."""

from __future__ import annotations

import errno
import signal

import pytest
import torch
import typer

from pneumo.render import fail_on_errors
from pneumo.shards.errors import PneumoError, StoreError


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


@pytest.fixture
def default_sigterm():
    """SIGTERM as a process starts with it (the system's default: death), as the CLI finds it."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def _sigterm_to_this_thread() -> None:
    # Refuse rather than kill the test run when no handler of the wrapper's is there.
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "SIGTERM would kill"
    signal.raise_signal(signal.SIGTERM)


def test_sigterm_is_one_line_with_exit_code_143(capsys, default_sigterm):
    def ingest_siim_cmd() -> None:
        _sigterm_to_this_thread()

    with pytest.raises(typer.Exit) as stopped:
        fail_on_errors(ingest_siim_cmd)()
    assert stopped.value.exit_code == 143
    assert capsys.readouterr().err.strip() == (
        "terminated: pneumo ingest siim stopped by SIGTERM; run the same command again to resume it"
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back


def test_a_failure_after_sigterm_is_the_termination(capsys, default_sigterm):
    def train_segment_cmd() -> None:
        try:
            _sigterm_to_this_thread()
        except KeyboardInterrupt:  # the SIGTERM, as Terminated: a KeyboardInterrupt too
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal") from None

    with pytest.raises(typer.Exit) as stopped:
        fail_on_errors(train_segment_cmd)()
    assert stopped.value.exit_code == 143
    assert capsys.readouterr().err.startswith("terminated: pneumo train segment stopped")


@pytest.mark.parametrize(
    ("filename", "line"),
    [
        (
            "/data/run/checkpoints/.last.pt.1f2e.tmp",
            "error: disk full: cannot write /data/run/checkpoints/.last.pt.1f2e.tmp (No space "
            "left on device); free some space and run it again",
        ),
        (None, "error: disk full (No space left on device); free some space and run it again"),
    ],
)
def test_a_full_disk_is_one_line_naming_the_file(capsys, filename, line):
    def train_segment_cmd() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    with pytest.raises(typer.Exit) as stopped:
        fail_on_errors(train_segment_cmd)()
    assert stopped.value.exit_code == 1
    assert capsys.readouterr().err == line + "\n"


class _Failing(torch.utils.data.IterableDataset):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __iter__(self):
        raise self.error


def _from_a_loader_worker(error: Exception) -> None:
    """What a training command sees when ``error`` is raised in a DataLoader worker: torch's
    re-raise, its message the worker's traceback."""
    batches = iter(torch.utils.data.DataLoader(_Failing(error), batch_size=None, num_workers=1))
    try:
        next(batches)
    finally:
        batches._shutdown_workers()  # now, not when the error and its traceback go


def test_our_error_in_a_loader_worker_is_its_own_line(capsys):
    message = "s3://bucket/ds/shards/siim/b0/train-pos-00000.tar: cannot reach the object store"

    def train_segment_cmd() -> None:
        _from_a_loader_worker(StoreError(message))

    with pytest.raises(typer.Exit) as stopped:
        fail_on_errors(train_segment_cmd)()
    assert stopped.value.exit_code == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_an_unreachable_endpoint_in_a_loader_worker_is_one_line(capsys):
    from botocore.exceptions import EndpointConnectionError

    url = "http://127.0.0.1:9/bucket/ds/shards/siim/b0/train-pos-00000.tar"

    def train_segment_cmd() -> None:  # torch cannot rebuild this class: a RuntimeError
        _from_a_loader_worker(EndpointConnectionError(endpoint_url=url))

    with pytest.raises(typer.Exit) as stopped:
        fail_on_errors(train_segment_cmd)()
    assert stopped.value.exit_code == 1
    assert capsys.readouterr().err == (
        f'error: object store request failed: Could not connect to the endpoint URL: "{url}"\n'
    )


def test_a_bug_in_a_loader_worker_keeps_its_traceback():
    def train_segment_cmd() -> None:
        _from_a_loader_worker(ValueError("a bug"))

    with pytest.raises(ValueError, match="Caught ValueError in DataLoader worker process 0"):
        fail_on_errors(train_segment_cmd)()
