"""Damage done to a dataset's shards with plain file operations, the way disks, cut uploads
and hands do it: bytes flipped inside an image, a shard cut short, a shard deleted, a member
header renamed. Where a sample lies is found with the standard library's ``tarfile``, not
with pneumo's own readers or its manifest, so the tests do not check pneumo against itself.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path


def copy_dataset(src: str | Path, dst: Path) -> Path:
    """A copy of a (session-wide, shared) dataset folder that a test may damage."""
    shutil.copytree(src, dst)
    return dst


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def keys_in(shard: Path) -> list[str]:
    """The sample keys of a shard, in tar order."""
    keys: list[str] = []
    for info in members(shard):
        key = info.name.split(".", 1)[0]
        if key not in keys:
            keys.append(key)
    return keys


def member(shard: Path, name: str) -> tarfile.TarInfo:
    return next(info for info in members(shard) if info.name == name)


def image_member(shard: Path, key: str) -> tarfile.TarInfo:
    return next(i for i in members(shard) if i.name in (f"{key}.jpg", f"{key}.png"))


def flip_image_bytes(shard: Path, key: str, n: int = 16) -> None:
    """Invert ``n`` bytes in the middle of ``key``'s image member (headers untouched)."""
    info = image_member(shard, key)
    data = bytearray(shard.read_bytes())
    start = info.offset_data + info.size // 2
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    shard.write_bytes(bytes(data))


def truncate_before(shard: Path, name: str) -> None:
    """Cut ``shard`` just before the header of member ``name`` (a member boundary; a sample
    boundary when ``name`` is a sample's first member)."""
    with shard.open("r+b") as f:
        f.truncate(member(shard, name).offset)


def truncate_before_sample(shard: Path, key: str) -> list[str]:
    """Cut ``shard`` at the sample boundary before ``key``; returns the keys cut off."""
    keys = keys_in(shard)
    first = next(info for info in members(shard) if info.name.split(".", 1)[0] == key)
    with shard.open("r+b") as f:
        f.truncate(first.offset)
    return keys[keys.index(key) :]


def truncate_inside_image(shard: Path, key: str) -> None:
    """Cut ``shard`` in the middle of ``key``'s image data (an upload cut off mid-byte)."""
    info = image_member(shard, key)
    with shard.open("r+b") as f:
        f.truncate(info.offset_data + info.size // 2)


def rename_member(shard: Path, name: str, new_name: str) -> None:
    """Rewrite member ``name``'s header under ``new_name`` (a valid header: checksum fixed)."""
    info = member(shard, name)
    renamed = tarfile.TarInfo(new_name)
    renamed.size, renamed.mtime, renamed.mode = info.size, info.mtime, info.mode
    header = renamed.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    data = bytearray(shard.read_bytes())
    data[info.offset : info.offset + tarfile.BLOCKSIZE] = header
    shard.write_bytes(bytes(data))
