"""What a clustering writes into LABELS: the label table, ``_clusters.json``, a 2-D PCA
scatter and a montage of each cluster's images (see :mod:`pneumo.pseudolabels.cluster`)."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pneumo.pseudolabels.parquet import fingerprint, read_json, write_json
from pneumo.shards import manifest, stream
from pneumo.shards.errors import ConfigError
from pneumo.shards.manifest import write_part
from pneumo.shards.members import image_suffix
from pneumo.shards.store import open_store
from pneumo.training.decode import decode_image

if TYPE_CHECKING:
    from pneumo.pseudolabels.cluster import ClusterConfig

log = logging.getLogger(__name__)

LABELS_PART = "part-0.parquet"
CLUSTERS_FILE = "_clusters.json"
SCATTER_FILE = "_scatter.png"
MONTAGE_FILE = "_montage.png"
EMBED_FILE = "_embed.json"  # written by pneumo.pseudolabels.embed beside the embeddings
THUMB = 96  # montage tile side, pixels
MAX_ROWS = 30  # clusters shown in the montage (the largest)
MAX_POINTS = 20_000  # points drawn in the scatter


def _png(fig) -> bytes:  # noqa: ANN001 - a matplotlib Figure
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def scatter_png(z: np.ndarray, fit: np.ndarray, labels: np.ndarray, *, seed: int) -> bytes:
    """The rows on the first two principal axes of ``z`` (fitted on the fit rows), coloured by
    cluster, noise in grey; at most :data:`MAX_POINTS` of them, a seeded sample."""
    from sklearn.decomposition import PCA

    plt = _pyplot()
    xy = PCA(n_components=2, random_state=seed).fit(z[fit]).transform(z)
    rows = np.arange(len(z))
    if len(rows) > MAX_POINTS:
        rows = np.sort(np.random.default_rng([seed, 11]).choice(rows, MAX_POINTS, replace=False))
    fig, ax = plt.subplots(figsize=(7, 6))
    noise = rows[labels[rows] < 0]
    ax.scatter(xy[noise, 0], xy[noise, 1], s=3, c="lightgrey", label="noise")
    cmap = plt.get_cmap("tab20")
    for c in range(int(labels.max()) + 1):
        pts = rows[labels[rows] == c]
        ax.scatter(xy[pts, 0], xy[pts, 1], s=3, color=cmap(c % 20), label=str(c))
    ax.set_title(f"{len(z):,} embeddings, {int(labels.max()) + 1} clusters (PCA 1-2)")
    if labels.max() < 20:
        ax.legend(markerscale=4, fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    return _png(fig)


def typical_members(z: np.ndarray, labels: np.ndarray, per_cluster: int) -> list[np.ndarray]:
    """For each cluster (largest first, at most :data:`MAX_ROWS`), the rows nearest its mean."""
    out = []
    for c in range(min(int(labels.max()) + 1, MAX_ROWS)):
        rows = np.flatnonzero(labels == c)
        distance = np.linalg.norm(z[rows] - z[rows].mean(0), axis=1)
        out.append(rows[np.lexsort((rows, distance))[:per_cluster]])
    return out


def read_thumbnails(dataset: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The images of ``keys`` in DATASET's shards, as uint8 ``[THUMB, THUMB]``."""
    store = open_store(dataset, create=False)
    wanted = set(keys)
    table = manifest.read(store, columns=stream.ENTRY_COLUMNS)
    entries = [e for e in stream.entries_from_table(table) if e.key in wanted]
    by_shard: dict[str, dict[str, stream.Entry]] = {}
    for e in entries:
        by_shard.setdefault(e.shard, {})[e.key] = e
    out = {}
    for shard, members in sorted(by_shard.items()):
        for sample in stream.read_shard(store, shard, members):
            suffix = image_suffix(sample)
            if suffix is None:  # the checked stream never gives one: kept as a guard
                continue
            image, _ = decode_image(sample[suffix], suffix, THUMB)
            if image.dtype != np.uint8:  # 16-bit images come back windowed to [0, 1]
                image = (image * 255).round().astype(np.uint8)
            out[sample["__key__"]] = image
    if len(out) < len(wanted):
        log.warning("%d of the montage's images are not in %s", len(wanted) - len(out), dataset)
    return out


def montage_png(
    dataset: str, keys: Sequence[str], z: np.ndarray, labels: np.ndarray, *, per_cluster: int
) -> bytes:
    """One row per cluster: its ``per_cluster`` most typical images (nearest its mean)."""
    plt = _pyplot()
    rows = typical_members(z, labels, per_cluster)
    images = read_thumbnails(dataset, [keys[i] for r in rows for i in r])
    step = THUMB + 4
    canvas = np.full((step * len(rows), step * per_cluster), 255, np.uint8)
    for r, members in enumerate(rows):
        for c, i in enumerate(members):
            image = images.get(keys[i])
            if image is not None:
                canvas[r * step : r * step + THUMB, c * step : c * step + THUMB] = image
    sizes = np.bincount(labels[labels >= 0])
    fig, ax = plt.subplots(figsize=(1.1 * per_cluster + 1.2, 1.1 * len(rows) + 0.6))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255)
    ax.set_yticks([r * step + THUMB / 2 for r in range(len(rows))])
    ax.set_yticklabels([f"{r} ({sizes[r]:,})" for r in range(len(rows))])
    ax.set_xticks([])
    ax.set_title("clusters (size): the images nearest each centre")
    fig.tight_layout()
    return _png(fig)


def summarise(
    cfg: ClusterConfig,
    table: pa.Table,
    x: np.ndarray,
    fit: np.ndarray,
    labels: np.ndarray,
    out_labels: np.ndarray,
    params: dict[str, Any],
    pca_info: dict[str, Any],
) -> dict[str, Any]:
    n_clusters = int(labels.max()) + 1
    sizes = np.bincount(labels[labels >= 0], minlength=n_clusters)
    noise_rows = int((labels < 0).sum())
    embed_meta = read_json(open_store(cfg.embeddings, create=False), EMBED_FILE) or {}
    return {
        "method": cfg.method,
        "parameters": params,
        "clusters": n_clusters,
        "sizes": sizes.tolist(),
        "rows": len(labels),
        "fit_rows": int(fit.sum()),
        "labelled_rows": len(out_labels),
        "noise_rows": noise_rows,
        "noise_share": noise_rows / len(labels),
        "noise_label": n_clusters if cfg.noise == "class" and noise_rows else None,
        "majority_share": float(np.bincount(out_labels).max() / len(out_labels)),
        "pca": pca_info,
        "embeddings": cfg.embeddings,
        "embeddings_fingerprint": fingerprint(table.column("key").to_pylist(), x),
        "embeddings_source": {
            k: embed_meta.get(k)
            for k in ("checkpoint", "checkpoint_sha256", "manifest_fingerprint", "dataset")
        },
        "config": asdict(cfg),
    }


def write_labels(cfg: ClusterConfig, keys: list[str], labels: np.ndarray, summary: dict) -> None:
    store = open_store(cfg.out)
    others = [p for p in store.list() if p.endswith(".parquet") and p != LABELS_PART]
    if others:
        raise ConfigError(
            f"{store.url} holds other Parquet files ({others[0]}, ...): choose an empty --out"
        )
    table = pa.table({"key": pa.array(keys, pa.string()), "label": pa.array(labels, pa.int64())})
    write_part(store, LABELS_PART, table)
    write_json(store, CLUSTERS_FILE, summary)


def write_plots(
    cfg: ClusterConfig, keys: list[str], z: np.ndarray, fit: np.ndarray, labels: np.ndarray
) -> None:
    store = open_store(cfg.out)
    store.put(SCATTER_FILE, scatter_png(z, fit, labels, seed=cfg.seed))
    dataset = cfg.dataset
    if dataset is None:
        meta = read_json(open_store(cfg.embeddings, create=False), EMBED_FILE) or {}
        dataset = meta.get("dataset")
    if dataset is None or cfg.montage_images == 0:
        log.warning("no DATASET known for the embeddings' images (--dataset): no montage")
        return
    store.put(MONTAGE_FILE, montage_png(dataset, keys, z, labels, per_cluster=cfg.montage_images))
