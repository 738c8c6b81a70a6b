"""A learnable NIH stand-in: noisy grey PNGs, the positives with a bright block
(:func:`pneumo.synthetic.chest.block_xray`), written straight into shards and a manifest
part (no ingest) with tests/conftest.py's helper."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from pneumo.synthetic.chest import block_xray


def nih_rows(n: int, *, split: str, start: int, pos_every: int) -> list[dict]:
    """Manifest rows of ``n`` NIH images (one patient each), every ``pos_every``-th positive."""
    rows = []
    for i in range(start, start + n):
        rows.append({
            "key": f"{i:08d}_000", "image_id": f"{i:08d}_000.png", "dataset": "nih",
            "split": split, "has_ptx": i % pos_every == 0, "rows": 64, "cols": 64,
            "patient_key": f"patient{i:05d}", "image_format": "png", "bit_depth": 8,
            "findings": ["Pneumothorax"] if i % pos_every == 0 else [],
        })  # fmt: skip
    return rows


def write_nih(root: Path, write_shards, rows: list[dict], *, seed: int = 0, batch: str = "n0"):
    """Shards (PNG per row, learnable) and the manifest part of NIH ``rows`` under ``root``."""
    members = {}
    for row in rows:
        rng = np.random.default_rng([seed, int(row["key"][:8])])
        data = _png(block_xray(rng, bool(row["has_ptx"])))
        row["content_sha256"] = hashlib.sha256(data).hexdigest()
        members[row["key"]] = {"png": data, "json": b"{}"}
    write_shards(
        root, rows, lambda row: members[row["key"]], per_shard=16, one_shard=False,
        batch=batch, dataset="nih",
    )  # fmt: skip


def _png(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()
