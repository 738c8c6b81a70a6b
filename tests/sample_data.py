"""Where the tests find the real sample files: the full set, or the part of it in tests/data.

The full set is ``../shared/data`` beside the repository, or ``$PNEUMO_SHARED_DATA``
(see tests/data/PROVENANCE.md for where every file comes from). A fresh clone has only
``tests/data``: byte-identical copies of part of the full set, at the same relative paths;
a folder there holds all the files of its counterpart, or is absent.

:func:`root` gives the full set when it is there, else ``tests/data`` as a :class:`SamplePath`.
Joining such a path (``root() / "nih" / "Data_Entry_2017.csv.gz"``) to a file that
``tests/data`` does not carry skips the test that asked for it, with a reason starting with
:data:`SKIP_REASON` (tests/conftest.py counts those skips in one summary line); under
``CI=true`` it fails the test instead, since CI must run everything. At import time (a test
module's constants) the join gives a :class:`MissingSample`, which skips or fails the test
that first reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import pytest

COMMITTED = Path(__file__).resolve().parent / "data"
DEFAULT_FULL_SET = Path(__file__).resolve().parents[2] / "shared" / "data"
SKIP_REASON = "needs a sample file that tests/data lacks"

# Set once collection is over (tests/conftest.py): from then on a missing file skips at once.
collection_done = False


def full_set() -> Path | None:
    """The full sample set, or None when neither $PNEUMO_SHARED_DATA nor ../shared/data is."""
    path = Path(os.environ.get("PNEUMO_SHARED_DATA") or DEFAULT_FULL_SET)
    return path if path.is_dir() else None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def root() -> Path:
    """The folder of sample files: the full set if present, else tests/data."""
    full = full_set()
    return full if full is not None else SamplePath(COMMITTED)


def _missing(path: Path) -> NoReturn:
    rel = path.relative_to(COMMITTED).as_posix()
    why = (
        f"{SKIP_REASON}: {rel} (the full set is ../shared/data or $PNEUMO_SHARED_DATA; "
        "see tests/data/PROVENANCE.md)"
    )
    if in_ci():
        pytest.fail(f"CI=true and the sample data is incomplete: {why}", pytrace=False)
    pytest.skip(why)


class SamplePath(type(Path())):  # type: ignore[misc]
    """A path under tests/data; a join that leaves what tests/data carries is missing."""

    def __truediv__(self, key: Any) -> Path:
        child = super().__truediv__(key)
        if os.path.lexists(str(child)):
            return child
        if collection_done:
            _missing(child)
        return MissingSample(child)


class MissingSample(SamplePath):
    """A sample file tests/data does not carry: reading it skips (or, in CI, fails) the test."""

    def __truediv__(self, key: Any) -> Path:
        return MissingSample(Path.__truediv__(self, key))

    def __fspath__(self) -> NoReturn:
        _missing(self)

    def _gone(self, *args: Any, **kwargs: Any) -> NoReturn:
        _missing(self)

    open = read_bytes = read_text = stat = exists = is_file = is_dir = _gone  # type: ignore[assignment]
    glob = rglob = iterdir = _gone  # type: ignore[assignment]
