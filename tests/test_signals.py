"""SIGTERM as a Kubernetes eviction, a preemption or ``timeout`` sends it, to the real
``pneumo``: one line, exit code 143, no process of the command's group left, no temp file
left, and training saves its place first (the loop's side: tests/training/test_interrupt.py).

Kubernetes signals the container's main process alone; ``timeout``, systemd and Slurm signal
the whole group: both are tried.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pneumo.shards import selections

pytestmark = pytest.mark.integration

WAIT_S = 300  # for a moment to come or a process to end: generous, a loaded CI machine


def start(args: list[str]) -> subprocess.Popen[str]:
    """``pneumo ARGS`` in its own process group (a pod's, a terminal's)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pneumo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_until(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"ended before SIGTERM: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, "never got to the moment of the SIGTERM"
        time.sleep(0.02)


def sigterm(proc: subprocess.Popen[str], *, group: bool) -> subprocess.CompletedProcess[str]:
    """SIGTERM to the process (as Kubernetes sends it) or its group; its output once it
    and every process of its group are gone."""
    try:
        (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT_S)
        deadline = time.monotonic() + 30
        while group_alive(proc.pid):
            assert time.monotonic() < deadline, f"processes of the group left: {err}"
            time.sleep(0.02)
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def temp_files(root: Path) -> list[Path]:
    """Temp files, and whatever is in the ingest's scratch folder."""
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".scratch/" in str(p)]


def terminated_line(command: str) -> str:
    return (
        f"terminated: pneumo {command} stopped by SIGTERM; run the same command again to resume it"
    )


@pytest.mark.parametrize("group", [False, True], ids=["process", "group"])
def test_sigterm_during_ingest(shared_data: Path, tmp_path: Path, group: bool) -> None:
    src, out = tmp_path / "in", tmp_path / "ds"
    src.mkdir()
    for p in sorted((shared_data / "siim" / "sample_images").glob("*.dcm")):
        shutil.copy(p, src / p.name)
    fifo = src / "zz-stuck.dcm"  # reading it blocks until a writer comes: a slow disk
    os.mkfifo(fifo)
    writer: list[int] = []

    def a_worker_reads_the_fifo() -> bool:
        try:  # opens once a reader (the pool worker decoding it) has it open
            writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        return bool(writer)

    args = ["ingest", "siim", str(src), "--out", str(out), "--shard-size", "2", "--workers", "2"]
    proc = start(args)
    try:
        wait_until(proc, a_worker_reads_the_fifo)
        done = sigterm(proc, group=group)
    finally:
        for fd in writer:
            os.close(fd)
    assert done.returncode == 143, done.stderr
    lines = [x for x in done.stderr.splitlines() if not x.startswith("warning: no --nih-xref")]
    assert lines == [terminated_line("ingest siim")]  # no worker's BrokenPipe or traceback
    assert temp_files(out) == []
    fifo.unlink()
    fifo.touch()  # the same inputs, the stuck one now an empty file: the batch completes
    again = subprocess.run(
        [sys.executable, "-m", "pneumo", *args], capture_output=True, text=True, timeout=WAIT_S
    )
    assert again.returncode == 0, again.stderr
    assert "ingested 10" in again.stdout and "quarantined 1" in again.stdout


def train_args(dataset: str, run: Path) -> list[str]:
    """6 steps of 2 images on 2 loader workers, last.pt every 2 steps."""
    return [
        "train", "segment", dataset, "--out", str(run), "--size", "64", "--epochs", "1",
        "--steps-per-epoch", "6", "--batch-size", "2", "--workers", "2",
        "--checkpoint-every", "2", "--val-where", f"{selections.SIIM_VAL} and rows == 256",
    ]  # fmt: skip


def last_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]


@pytest.mark.slow
def test_sigterm_during_training_saves_and_the_rerun_resumes(dataset, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(train_args(dataset.url, run))
    wait_until(proc, (run / "checkpoints" / "last.pt").exists)  # step 2 is saved
    done = sigterm(proc, group=False)
    assert done.returncode == 143, done.stderr
    assert done.stderr.splitlines() == [terminated_line("train segment")]
    assert temp_files(run) == []
    saved = last_step(run)
    assert 2 <= saved < 6  # step 2's, or the step under way at the SIGTERM
    # What a SIGKILL during a checkpoint write leaves: the next run removes it.
    stale = run / "checkpoints" / ".last.pt.0123456789abcdef.tmp"
    stale.write_bytes(b"\0" * 1024)
    again = subprocess.run(
        [sys.executable, "-m", "pneumo", "-v", *train_args(dataset.url, run)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert again.returncode == 0, again.stderr
    assert f"resuming {run} at step {saved} " in again.stderr
    assert again.stdout.startswith("step 6/6,")
    assert temp_files(run) == []


@pytest.mark.slow
def test_sigterm_to_the_whole_group_during_training(dataset, tmp_path: Path) -> None:
    """The loader workers get it too: they leave quietly, and torch reports no dead worker."""
    run = tmp_path / "run"
    proc = start(train_args(dataset.url, run))
    wait_until(proc, (run / "checkpoints" / "last.pt").exists)
    done = sigterm(proc, group=True)
    assert done.returncode == 143, done.stderr
    assert done.stderr.splitlines() == [terminated_line("train segment")]
    assert temp_files(run) == []
    assert last_step(run) >= 2
