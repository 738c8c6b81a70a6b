"""The child processes of this one (a DataLoader's workers), read from /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path


def children() -> set[int]:
    """The pids whose parent is this process."""
    me, out = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                out.add(int(stat.parent.name))
        except (OSError, ValueError):  # gone meanwhile
            continue
    return out
