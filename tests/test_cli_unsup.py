"""The unsupervised arm as a user runs it: autoencode -> embed -> cluster -> classify -> segment."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KINDS = 3
PER_KIND = {"train": 16, "val": 8}


def _image(kind: int, rng: np.random.Generator) -> np.ndarray:
    """Three kinds of 64 px image a random conv net tells apart: left-right ramp,
    top-bottom ramp, a checkerboard; each with its own noise and contrast."""
    ramp = np.linspace(0, 1, 64)
    base = [
        np.tile(ramp, (64, 1)),
        np.tile(ramp[:, None], (1, 64)),
        ((np.arange(64)[:, None] // 8 + np.arange(64)[None, :] // 8) % 2).astype(float),
    ][kind]
    pixels = 40 + 170 * base * rng.uniform(0.8, 1.0) + rng.normal(0, 8, (64, 64))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, write_shards) -> tuple[Path, dict[str, int]]:
    """A dataset of the three kinds (unlabelled for pneumothorax), and each key's kind."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    rows, members, kinds = [], {}, {}
    for split, per in PER_KIND.items():
        for kind in range(KINDS):
            for i in range(per):
                key = f"{split}{kind}x{i:02d}"
                ok, png = cv2.imencode(".png", _image(kind, rng))
                members[key] = {"png": png.tobytes(), "json": b"{}"}
                kinds[key] = kind
                rows.append({
                    "key": key, "image_id": key, "dataset": "nih", "split": split,
                    "has_ptx": None, "rows": 64, "cols": 64, "image_format": "png",
                    "bit_depth": 8, "content_sha256": key, "patient_key": key,
                })  # fmt: skip
    write_shards(
        root / "ds", rows, lambda r: members[r["key"]], per_shard=12, one_shard=False, dataset="nih"
    )
    return root / "ds", kinds


@pytest.fixture(scope="module")
def pseudo_labelled(planted, tmp_path_factory, pneumo) -> dict:
    """autoencode -> embed -> cluster -> classify on the planted kinds, by the CLI."""
    dataset, kinds = planted
    tmp = tmp_path_factory.mktemp("pseudo")
    ae, emb, labels, cls = (str(tmp / n) for n in ("ae", "emb", "labels", "cls"))
    pneumo(
        "train", "autoencode", str(dataset), "--out", ae, "--kind", "ae", "--size", "64",
        "--latent-dim", "16", "--batch-size", "8", "--epochs", "1", "--steps-per-epoch", "4",
        "--workers", "0", "--lr", "1e-3",
    )  # fmt: skip
    pneumo("embed", ae, str(dataset), "--out", emb, "--workers", "0", "--batch-size", "16")
    out = pneumo(
        "cluster", emb, "--out", labels, "--clusters", str(KINDS), "--method", "kmeans",
        "--pca", "8", "--fit-where", "split == 'train'",
    )  # fmt: skip
    table = ds.dataset(labels, format="parquet").to_table()
    pneumo(
        "train", "classify", str(dataset), "--out", cls, "--labels", labels,
        "--balance", "classes", "--where", "split == 'train'", "--val-where", "split == 'val'",
        "--size", "64", "--batch-size", "8", "--epochs", "4", "--steps-per-epoch", "8",
        "--workers", "0", "--arch", "resnet18", "--optimizer", "sgd", "--lr", "1e-3",
    )  # fmt: skip
    lines = (tmp / "cls" / "metrics.jsonl").read_text().splitlines()
    return {
        "kinds": kinds,
        "stdout": out.stdout,
        "labels": dict(zip(table["key"].to_pylist(), table["label"].to_pylist(), strict=True)),
        "metrics": [json.loads(line) for line in lines],
    }


def test_clusters_of_embeddings_find_the_planted_kinds(pseudo_labelled) -> None:
    kinds, found = pseudo_labelled["kinds"], pseudo_labelled["labels"]
    assert f"{KINDS} clusters (kmeans)" in pseudo_labelled["stdout"]
    assert set(found) == set(kinds)  # train and val rows alike
    keys = sorted(found)
    assert adjusted_rand_score([kinds[k] for k in keys], [found[k] for k in keys]) >= 0.9


def test_a_classifier_learns_the_cluster_labels(pseudo_labelled) -> None:
    rows = pseudo_labelled["metrics"]
    assert len(rows) == 4 and rows[-1]["val_majority_rate"] == pytest.approx(1 / KINDS)
    # Macro one-vs-rest AUROC: guessing the majority class scores 0.5.
    assert max(r["val_auroc"] for r in rows) >= 0.9


def test_the_classifier_beats_the_majority_share(pseudo_labelled) -> None:
    last = pseudo_labelled["metrics"][-1]
    assert last["val_accuracy"] > last["val_majority_rate"] + 0.2


def test_the_whole_chain_on_the_siim_demo(tmp_path: Path, pneumo) -> None:
    raw, dataset = tmp_path / "raw", str(tmp_path / "ds")
    pneumo("demo-data", "siim", str(raw), "--n", "40", "--size", "128")
    pneumo(
        "ingest", "siim", str(raw / "dicom-images-train"), "--labels", str(raw / "train-rle.csv"),
        "--out", dataset, "--split-fractions", "0.6,0.2,0.2",
    )  # fmt: skip
    ae, emb, labels, cls, seg = (str(tmp_path / n) for n in ("ae", "emb", "lab", "cls", "seg"))
    small = ["--size", "64", "--batch-size", "4", "--epochs", "1", "--steps-per-epoch", "2"]
    pneumo("train", "autoencode", dataset, "--out", ae, "--kind", "vae", "--latent-dim", "8",
           "--workers", "0", *small)  # fmt: skip
    assert (tmp_path / "ae" / "reconstructions.png").exists()
    pneumo("embed", ae, dataset, "--out", emb, "--workers", "0")
    meta = json.loads((tmp_path / "emb" / "_embed.json").read_text())
    assert meta["rows"] == 40 and meta["dim"] == 8 and meta["embedding"] == "mu"
    pneumo("cluster", emb, "--out", labels, "--clusters", "3", "--method", "kmeans", "--pca", "4")
    assert (tmp_path / "lab" / "_montage.png").exists()  # images found through _embed.json
    pneumo(
        "train", "classify", dataset, "--out", cls, "--labels", labels, "--balance", "classes",
        "--where", "split == 'train'", "--val-where", "split == 'val'", "--workers", "0", *small,
    )  # fmt: skip
    pneumo("train", "segment", dataset, "--out", seg, "--encoder-init", cls, "--workers", "0",
           *small)  # fmt: skip
    best = torch.load(tmp_path / "seg" / "checkpoints" / "best.pt", weights_only=True)
    chain = json.dumps(best["init"])
    assert "cls" in chain  # the U-Net's encoder came from the pseudo-label classifier
