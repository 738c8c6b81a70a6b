"""The DataLoader that runs the stream's batches in worker processes, and what a worker sets up.

Process plumbing, kept apart from what a batch holds (:mod:`pneumo.training.data`) and from a
run's long-lived loader (:mod:`pneumo.training.run_loader`), which both make their
DataLoader here: the loader's own generator (so starting one does not shift torch's global
RNG), whole batches passed as they are, a worker's batch tensors made in shared memory, and
the signals a worker leaves to its parent (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

PREFETCH_BATCHES = 2  # per worker


def dataloader(dataset: IterableDataset, workers: int, *, persistent: bool) -> DataLoader:
    """A DataLoader of whole batches. It has its own generator: starting an iterator draws
    the workers' base seed, which from torch's global RNG would shift every later draw of
    the training (a VAE's noise) by one, and a resumed run would no longer follow the
    uninterrupted one. The stream needs no worker seed: every sample carries its own."""
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        collate_fn=_as_is,  # already tensors; default_convert would turn tuples into lists
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=persistent and workers > 0,
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        worker_init_fn=_worker_signals,
        generator=torch.Generator().manual_seed(0),
    )


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a loader worker, in shared memory already.

    A worker's batch travels to the main process through shared memory: made there from
    the start (as torch's ``default_collate`` does), it is not copied into it on the way.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def worker_id() -> int:
    """This process's loader worker number (0 outside a loader worker)."""
    # Leave cv2's threads alone here: cv2.setNumThreads in a forked worker waits forever on
    # the thread pool it inherited from the parent.
    info = get_worker_info()
    return 0 if info is None else info.id


def _worker_signals(_worker: int) -> None:
    """Ctrl-C and SIGTERM are the parent's to handle (one line, see pneumo.render; training
    saves its place first), and it shuts the workers down. A loader worker ignores Ctrl-C
    (it would print its own traceback), and leaves at once on SIGTERM, quietly and with
    status 0, whoever sent it: the whole group killed (timeout, systemd, Slurm), or the
    parent's shutdown. A worker killed by the signal itself would make torch raise "worker
    killed by signal" in the parent, perhaps while it saves the checkpoint (torch's own
    handler exits with 0 only for a SIGTERM from the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave)
    sys.excepthook = _quiet_when_the_parent_hangs_up(sys.excepthook)


def _leave(signum: int, frame: FrameType | None) -> None:
    os._exit(0)


def _quiet_when_the_parent_hangs_up(hook: Callable[..., Any]) -> Callable[..., None]:
    """``hook``, silent for the error a worker sees when the training process stops in the
    middle of taking a batch (Ctrl-C, SIGTERM): a batch's tensors go to the parent as file
    descriptors, served by a thread of the worker (multiprocessing's resource sharer) that
    reports any error through ``sys.excepthook``; a parent that leaves mid-transfer gives it
    a broken pipe or an early end of data, and it would print a traceback after the
    parent's one line. Other errors are shown as before."""

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, (ConnectionError, EOFError)):
            return
        hook(kind, value, tb)

    return excepthook
