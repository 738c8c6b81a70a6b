"""Small datasets of real chest X-rays for the data-loading tests (session fixtures, made
shared by tests/conftest.py: training, pseudo-label and benchmark tests read them).

Images: the JPEG frames of the 21 real SIIM DICOMs in ``shared/data/siim`` (stored as the
ingest stores them: the compressed frame as it is), the real NIH PNGs downscaled to 256
pixels, and 16-bit PNGs made from those (no real 16-bit chest PNG is at hand). Masks are
ellipses, as 0/255 or 0/1 PNGs. 40 samples: 32 train (2 of them unlabelled), 8 val.

``dataset``: shards by split and label, at most 4 samples each; ``one_shard_dataset``: all
40 samples in one shard; ``s3_dataset``: ``dataset`` in a bucket of the session's S3 server.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import cv2
import numpy as np
import pydicom
import pytest
from nih_shards import nih_rows, write_nih
from pydicom.encaps import generate_frames

BATCH = "b0"
N_SAMPLES = 40


@dataclass
class Dataset:
    url: str
    rows: list[dict] = field(default_factory=list)
    members: dict[str, dict[str, bytes]] = field(default_factory=dict)  # key -> tar members

    def keys(self, split: str, labelled_only: bool = True) -> set[str]:
        return {
            r["key"]
            for r in self.rows
            if r["split"] == split and (r["has_ptx"] is not None or not labelled_only)
        }

    def row(self, key: str) -> dict:
        return next(r for r in self.rows if r["key"] == key)


def _siim_frames(data: Path) -> list[bytes]:
    frames = []
    for path in sorted((data / "siim").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        frames.append(next(generate_frames(ds.PixelData, number_of_frames=1)))
    return frames


def _nih_pngs(data: Path) -> list[np.ndarray]:
    paths = sorted((data / "nih" / "images_downscaled").glob("*_256px_*.png"))
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths]


def _png(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()


def _ellipse_mask(side: int, i: int, one: bool) -> bytes:
    mask = np.zeros((side, side), np.uint8)
    centre = (side // 3 + (i * 7) % (side // 3), side // 3 + (i * 13) % (side // 3))
    cv2.ellipse(mask, centre, (side // 8, side // 5), 15, 0, 360, 1 if one else 255, -1)
    return _png(mask)


def make_samples(data: Path) -> tuple[list[dict], dict[str, dict[str, bytes]]]:
    """Manifest rows (without shard) and tar members for the 40 samples."""
    frames, pngs = _siim_frames(data), _nih_pngs(data)
    rows, members = [], {}
    for i in range(N_SAMPLES):
        key = f"s{i:03d}"
        if i % 4 == 1:
            image, fmt, depth = pngs[i % len(pngs)], "png", 8
        elif i % 4 == 3:  # 12 bits used of 16, like most 16-bit X-ray PNGs
            image, fmt, depth = pngs[i % len(pngs)].astype(np.uint16) * 16 + 100, "png", 16
        else:
            image, fmt, depth = frames[i % len(frames)], "jpeg", 8
        data = image if isinstance(image, bytes) else _png(image)
        side = 1024 if fmt == "jpeg" else 256
        has_ptx = None if i in (7, 22) else i % 3 == 0
        members[key] = {"jpg" if fmt == "jpeg" else "png": data}
        if has_ptx:
            members[key]["mask.png"] = _ellipse_mask(side, i, one=i % 2 == 1)
        rows.append({
            "key": key, "image_id": f"1.2.276.0.{i}", "dataset": "siim", "batch": BATCH,
            "split": "val" if i % 5 == 4 else "train", "has_ptx": has_ptx,
            "rows": side, "cols": side, "image_format": fmt, "bit_depth": depth,
            "content_sha256": hashlib.sha256(data).hexdigest(),
        })  # fmt: skip
    return rows, members


def write_dataset(
    root: Path, data: Path, write_shards, *, per_shard: int, one_shard: bool
) -> Dataset:
    rows, members = make_samples(data)
    write_shards(
        root,
        rows,
        lambda row: {**members[row["key"]], "json": b"{}"},
        per_shard=per_shard,
        one_shard=one_shard,
        batch=BATCH,
    )
    return Dataset(url=str(root), rows=rows, members=members)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory, shared_data, write_shards) -> Dataset:
    return write_dataset(
        tmp_path_factory.mktemp("data-many"),
        shared_data,
        write_shards,
        per_shard=4,
        one_shard=False,
    )


@pytest.fixture(scope="session")
def one_shard_dataset(
    tmp_path_factory: pytest.TempPathFactory, shared_data, write_shards
) -> Dataset:
    return write_dataset(
        tmp_path_factory.mktemp("data-one"),
        shared_data,
        write_shards,
        per_shard=N_SAMPLES,
        one_shard=True,
    )


@pytest.fixture(scope="session")
def _s3_copy(dataset: Dataset, s3_endpoint: str, s3_buckets) -> str:
    """``dataset`` uploaded once to a bucket of this run on the session's S3 server."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_buckets.new()
    root = Path(dataset.url)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"many/{path.relative_to(root).as_posix()}")
    return f"s3://{bucket}/many"


def small_s3_dataset(
    root: Path, write_shards, bucket_url: str, *, shards: int, per_shard: int, seed: int,
    image_bytes: int,
) -> tuple[Path, str]:  # fmt: skip
    """``shards`` shards of ``per_shard`` samples of random bytes, written to ``root`` and
    uploaded under ``BUCKET_URL/ds``: (folder, s3 URL). For the store's tests."""
    rng = np.random.default_rng(seed)
    rows = [{"key": f"k{i:02d}", "image_id": f"k{i:02d}", "split": "train", "has_ptx": False,
             "dataset": "siim"} for i in range(shards * per_shard)]  # fmt: skip
    images = {r["key"]: rng.bytes(image_bytes) for r in rows}
    write_shards(root, rows, lambda r: {"jpg": images[r["key"]], "json": b"{}"},
                 per_shard=per_shard, one_shard=False)  # fmt: skip
    client = boto3.client("s3")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket_url[5:], f"ds/{path.relative_to(root).as_posix()}")
    return root, f"{bucket_url}/ds"


@pytest.fixture
def s3_dataset(_s3_copy: str, dataset: Dataset) -> Dataset:
    """``dataset`` in ``s3://BUCKET/many`` (the AWS_* variables point at its server)."""
    return Dataset(url=_s3_copy, rows=dataset.rows, members=dataset.members)


# ---------------------------------------------------------------- a learnable NIH stand-in


@pytest.fixture(scope="session")
def nih_demo(tmp_path_factory: pytest.TempPathFactory, write_shards) -> str:
    """128 learnable NIH-like images, a quarter positive: 64 train, 32 val, 32 test."""
    root = tmp_path_factory.mktemp("nih-demo")
    rows = (
        nih_rows(64, split="train", start=0, pos_every=4)
        + nih_rows(32, split="val", start=64, pos_every=4)
        + nih_rows(32, split="test", start=96, pos_every=4)
    )
    write_nih(root, write_shards, rows)
    return str(root)
