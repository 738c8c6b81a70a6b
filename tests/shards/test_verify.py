"""``pneumo verify``: a clean dataset passes; flipped image bytes (``--deep``), a shard cut at a
sample boundary, a deleted shard and a renamed member header are each listed by shard and key.

The damage is done to a copy of the real-image dataset of tests/stream_datasets.py with plain
file operations, its places found with ``tarfile`` (tests/shard_damage.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import shard_damage as damage

from pneumo.shards.store import open_store
from pneumo.shards.verify import Problem, verify


@pytest.fixture
def copy(dataset, tmp_path: Path) -> Path:
    return damage.copy_dataset(dataset.url, tmp_path / "ds")


def _shard_with(dataset, fmt: str, at_least: int = 1, but: str = "") -> tuple[str, list[str]]:
    """A shard (path in the dataset; not ``but``) holding a sample of image format ``fmt``
    and at least ``at_least`` samples, and the keys of its samples of that format."""
    by_shard: dict[str, list[dict]] = {}
    for row in dataset.rows:
        by_shard.setdefault(row["shard"], []).append(row)
    for shard, rows in sorted(by_shard.items()):
        keys = [r["key"] for r in rows if r["image_format"] == fmt]
        if keys and len(rows) >= at_least and shard != but:
            return shard, keys
    raise LookupError(fmt)


def _problems(proc) -> list[tuple[str, str, str]]:
    """The table's lines: ``SHARD  KEY  REASON``."""
    return [tuple(line.split("  ", 2)) for line in proc.stdout.splitlines()]  # type: ignore[misc]


@pytest.mark.integration
def test_a_clean_dataset_verifies_plain_and_deep(dataset, pneumo) -> None:
    plain = pneumo("verify", dataset.url)
    assert plain.returncode == 0 and plain.stdout == ""
    assert f"{len(dataset.rows)} samples" in plain.stderr and "no problems" in plain.stderr
    deep = pneumo("verify", dataset.url, "--deep", "--format", "json")
    assert deep.returncode == 0 and json.loads(deep.stdout) == []


def test_each_shard_is_read_once_front_to_back(dataset) -> None:
    store = open_store(dataset.url, create=False)
    reads: list[str] = []
    real = store.open_read
    store.open_read = lambda path: reads.append(path) or real(path)  # type: ignore[method-assign]
    store.open_range = None  # type: ignore[assignment]  # verify never asks for a range
    report = verify(store, deep=True)
    assert report.ok and report.samples == len(dataset.rows)
    assert sorted(reads) == sorted({r["shard"] for r in dataset.rows})


@pytest.mark.integration
def test_flipped_image_bytes_are_found_by_deep(dataset, copy: Path, pneumo) -> None:
    jpeg_shard, jpeg_keys = _shard_with(dataset, "jpeg")
    png_shard, png_keys = _shard_with(dataset, "png")
    damage.flip_image_bytes(copy / jpeg_shard, jpeg_keys[0])
    damage.flip_image_bytes(copy / png_shard, png_keys[-1])

    # The tar structure is intact: only the hash can tell.
    assert pneumo("verify", str(copy)).returncode == 0
    deep = pneumo("verify", str(copy), "--deep", "--format", "json", check=False)
    assert deep.returncode == 1
    found = json.loads(deep.stdout)
    assert sorted((p["shard"], p["key"]) for p in found) == sorted(
        [(jpeg_shard, jpeg_keys[0]), (png_shard, png_keys[-1])]
    )
    assert all("sha256" in p["reason"] for p in found)
    assert "2 problems" in deep.stderr


@pytest.mark.integration
def test_a_shard_cut_at_a_sample_boundary_lists_the_samples_cut_off(
    dataset, copy: Path, pneumo
) -> None:
    shard, _ = _shard_with(dataset, "jpeg", at_least=3)
    keys = damage.keys_in(copy / shard)
    cut = damage.truncate_before_sample(copy / shard, keys[1])

    proc = pneumo("verify", str(copy), check=False)
    assert proc.returncode == 1
    problems = _problems(proc)
    assert [(s, k) for s, k, _ in problems] == [(shard, k) for k in cut]
    assert all("the shard ends at byte" in reason for _, _, reason in problems)


@pytest.mark.integration
def test_a_deleted_shard_lists_each_of_its_samples(dataset, copy: Path, pneumo) -> None:
    shard, _ = _shard_with(dataset, "png", at_least=2)
    keys = damage.keys_in(copy / shard)
    (copy / shard).unlink()

    proc = pneumo("verify", str(copy), "--format", "json", check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == [
        {"shard": shard, "key": k, "reason": "the shard does not exist"} for k in sorted(keys)
    ]


@pytest.mark.integration
def test_a_header_naming_another_key_is_found_without_deep(dataset, copy: Path, pneumo) -> None:
    shard, keys = _shard_with(dataset, "jpeg")
    damage.rename_member(copy / shard, f"{keys[0]}.jpg", "stray.jpg")

    proc = pneumo("verify", str(copy), check=False)
    assert proc.returncode == 1
    ((where, key, reason),) = _problems(proc)
    assert (where, key) == (shard, keys[0]) and "'stray.jpg'" in reason


def test_a_shard_cut_inside_its_last_sample_is_found(dataset, copy: Path) -> None:
    """The shard ends after a PNG sample's JSON member, before its image (its members are
    json, [mask.png,] png): a cut at a member boundary, inside the sample."""
    shard, key = next(
        (r["shard"], r["key"])
        for r in dataset.rows
        if r["image_format"] == "png" and damage.keys_in(copy / r["shard"])[-1] == r["key"]
    )
    damage.truncate_before(copy / shard, f"{key}.png")
    report = verify(open_store(str(copy), create=False))
    assert [(p.shard, p.key) for p in report.problems] == [(shard, key)]
    assert "the shard ends at byte" in report.problems[0].reason


@pytest.mark.integration
def test_verify_reads_s3_shards_as_streams(dataset, copy: Path, s3_bucket: str) -> None:
    """On S3 nothing seeks: skipped bytes are read past, and the end of a cut shard is where
    its GET ends."""
    jpeg_shard, jpeg_keys = _shard_with(dataset, "jpeg", at_least=3)
    damage.flip_image_bytes(copy / jpeg_shard, jpeg_keys[0])
    cut = damage.truncate_before_sample(copy / jpeg_shard, damage.keys_in(copy / jpeg_shard)[2])
    gone, _ = _shard_with(dataset, "png", but=jpeg_shard)
    gone_keys = damage.keys_in(copy / gone)
    (copy / gone).unlink()
    client = boto3.client("s3")
    for path in sorted(p for p in copy.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_bucket[5:], f"ds/{path.relative_to(copy).as_posix()}")

    report = verify(open_store(f"{s3_bucket}/ds", create=False), deep=True)
    expected = {(jpeg_shard, k) for k in [jpeg_keys[0], *cut]} | {(gone, k) for k in gone_keys}
    assert {(p.shard, p.key) for p in report.problems} == expected
    assert Problem(gone, gone_keys[0], "the shard does not exist") in report.problems
