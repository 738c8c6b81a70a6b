"""LocalStore writes are atomic: a write that fails part-way leaves the old object whole.

The failure is made by the operating system, not by patching the code under test: the
child process gets a file-size limit below the new object's size, so any write that goes
past it fails (EFBIG). A put that wrote in place would leave a truncated object behind.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pneumo.shards.store import LocalStore

_CHILD = r"""
import resource, signal, sys
from pathlib import Path
from pneumo.shards.store import LocalStore

root, how, src = sys.argv[1:4]
store = LocalStore(Path(root))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
try:
    if how == "put":
        store.put("dir/part.parquet", Path(src).read_bytes())
    else:
        store.put_file("dir/part.parquet", src)
except OSError:
    sys.exit(0)
sys.exit(3)
"""


@pytest.mark.parametrize("how", ["put", "put_file"])
def test_a_write_that_fails_part_way_leaves_the_old_object(tmp_path, how):
    store = LocalStore(tmp_path / "store")
    old = b"old" * 10
    store.put("dir/part.parquet", old)
    new = tmp_path / "new.bin"
    new.write_bytes(b"new" * 100_000)  # 300 kB, past the child's 64 kB limit
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "store"), how, str(new)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"the write did not fail: {proc.returncode} {proc.stderr}"
    assert store.get("dir/part.parquet") == old
    assert store.list() == ["dir/part.parquet"]  # no half-written object visible
    assert [p.name for p in (tmp_path / "store" / "dir").iterdir()] == ["part.parquet"]


@pytest.mark.parametrize("how", ["put", "put_if_absent"])
def test_a_full_disk_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch, how):
    """write() and fsync() report ENOSPC without a file name: the store adds it (the CLI's
    one line then says which file could not be written)."""
    import errno

    store = LocalStore(tmp_path / "store")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        getattr(store, how)("batches/siim-b1/lease-000000.json", b"{}")
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(tmp_path / "store/batches/siim-b1/lease-000000.json")
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
