"""``pneumo cluster``: embeddings -> PCA -> DBSCAN | HDBSCAN | k-means -> pseudo-labels.

The flow of :func:`cluster`, top to bottom:

1. read EMBEDDINGS (any Parquet dataset with ``key`` and ``embedding``), rows sorted by key;
   the ``fit_where`` rows are the *fit rows* (default: all);
2. PCA to ``pca`` dimensions fitted on the fit rows only (no test image shapes the
   projection), whitened; every row projected and L2-normalised. Components explaining less
   than ``min_variance`` of the variance are dropped first: whitening scales each component
   to unit variance, so a near-empty one (a collapsed latent dimension, or ``pca`` above the
   embeddings' real rank) would weigh its noise as much as the signal;
3. the method, fitted on the fit rows. DBSCAN has no cluster count: ``clusters`` makes it
   search its radius (HDBSCAN: the cut of its one tree, ``dbscan_clustering``) for that many
   clusters, and when no radius gives them it fails with what it found, suggesting k-means;
   it never falls back silently. DBSCAN and HDBSCAN fit on a seeded sample of at most
   ``sample`` fit rows (memory and time, see :mod:`pneumo.pseudolabels.dbscan`); every row
   then gets the cluster of its nearest core point within the radius, or is noise. k-means
   assigns every row to its nearest centre;
4. clusters numbered by size (0 = the largest); noise rows dropped, or made one more class;
5. the outputs, in LABELS (folder or ``s3://``): ``part-0.parquet`` (``key``, ``label``),
   ``_clusters.json`` (method, parameters found, sizes, noise and majority shares, the
   embeddings' fingerprint), ``_scatter.png`` (2-D PCA coloured by cluster) and
   ``_montage.png`` (the images nearest each cluster's centre, read from the dataset's
   shards). The ``_`` names keep ``pyarrow.dataset.dataset(LABELS)`` to the table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from pneumo.pseudolabels import dbscan
from pneumo.pseudolabels.outputs import summarise, write_labels, write_plots
from pneumo.pseudolabels.parquet import open_parquet, vectors
from pneumo.shards.errors import ConfigError, ManifestError, PneumoError
from pneumo.shards.query import parse_where
from pneumo.shards.store import open_store

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
METHODS = ("dbscan", "hdbscan", "kmeans")
NOISE = ("drop", "class")
N_CUTS = 512  # HDBSCAN cuts tried, geometrically spaced


class ClusterError(PneumoError):
    """The clustering cannot give what was asked (e.g. no radius gives K clusters)."""


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """What a clustering depends on; stored whole in ``_clusters.json``.

    Attributes:
        embeddings: Parquet dataset (folder or s3://) with ``key`` and ``embedding``.
        out: LABELS folder or s3:// prefix.
        pca: PCA components (fewer when the embeddings have fewer dimensions).
        min_variance: the smallest share of the variance a kept component explains.
        clusters: clusters wanted; DBSCAN/HDBSCAN search their radius for it.
        method: ``dbscan``, ``hdbscan`` or ``kmeans``.
        min_samples: DBSCAN's core-point count (the point itself included, as sklearn).
        min_cluster_size: the fewest core points (DBSCAN) or members (HDBSCAN) a cluster
            has; smaller groups are noise. None: ``min_samples``.
        noise: ``drop`` noise rows from LABELS, or make them the ``class`` after the last.
        fit_where: rows that fit PCA and the clustering (``--where`` syntax); None: all.
        seed: seeds the fit sample, PCA and k-means.
        eps: a DBSCAN radius / HDBSCAN cut to use as it is (no search).
        max_noise: a radius leaving a larger noise share does not count as a solution.
        sample: DBSCAN/HDBSCAN fit on at most this many fit rows.
        dataset: DATASET whose shards hold the images (montage); None: the one the
            embeddings' ``_embed.json`` names, or no montage.
        montage_images: images per cluster in the montage.
    """

    embeddings: str
    out: str
    pca: int = 50
    min_variance: float = 1e-3
    clusters: int | None = 14
    method: str = "dbscan"
    min_samples: int = 10
    min_cluster_size: int | None = None
    noise: str = "drop"
    fit_where: str | None = None
    seed: int = 0
    eps: float | None = None
    max_noise: float = 0.5
    sample: int = 20_000
    dataset: str | None = None
    montage_images: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.noise not in NOISE:
            raise ConfigError(f"--noise {self.noise!r}: expected drop or class")
        if self.clusters is not None and self.clusters < 2:
            raise ConfigError(f"--clusters must be at least 2, got {self.clusters}")
        if self.clusters is None and (self.method == "kmeans" or self.eps is None):
            raise ConfigError(f"--method {self.method} needs --clusters (or --eps for DBSCAN)")
        if self.eps is not None and not self.eps > 0:
            raise ConfigError(f"--eps must be positive, got {self.eps}")
        if self.pca < 1 or self.min_samples < 2 or self.montage_images < 0:
            raise ConfigError("--pca must be >= 1, --min-samples >= 2, montage images >= 0")
        if not 0 <= self.min_variance < 1:
            raise ConfigError(f"--min-variance must be in [0, 1), got {self.min_variance}")
        if not 0 <= self.max_noise < 1:
            raise ConfigError(f"--max-noise must be in [0, 1), got {self.max_noise}")
        if self.min_cluster_size is not None and self.min_cluster_size < 1:
            raise ConfigError("--min-cluster-size must be at least 1")
        if self.sample < 2 * self.min_samples:
            raise ConfigError(f"sample {self.sample} is too small for --min-samples")

    @property
    def smallest_cluster(self) -> int:
        return self.min_cluster_size or self.min_samples


def cluster(cfg: ClusterConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Cluster embeddings into a pseudo-label table (see the module doc).

    ``progress`` gets ``{"stage": "read" | "pca" | "fit" | "write"}`` as each stage starts.

    Returns:
        The summary written to ``_clusters.json``, with ``out``.

    Raises:
        ClusterError: no radius gives ``clusters`` clusters, or every row is noise.
        ManifestError: the embeddings are missing, malformed, or ``fit_where`` is.
        ConfigError: ``out`` already holds other Parquet parts.
    """
    report = progress or (lambda _: None)
    report({"stage": "read"})
    table = _read(cfg.embeddings)
    keys = table.column("key").to_pylist()
    x = vectors(table, "embedding", cfg.embeddings)
    fit = _fit_rows(table, cfg.fit_where)
    report({"stage": "pca"})
    z, pca_info = project(x, fit, cfg.pca, cfg.seed, min_variance=cfg.min_variance)
    report({"stage": "fit"})
    fitter = {"dbscan": _dbscan, "hdbscan": _hdbscan, "kmeans": _kmeans}[cfg.method]
    raw, params = fitter(z, fit, cfg)
    _check_noise(cfg, raw[fit], params)
    labels = number_by_size(raw)
    n_clusters = int(labels.max()) + 1 if (labels >= 0).any() else 0
    if n_clusters == 0:
        raise ClusterError(f"every row is noise with {params}: lower --min-samples or use kmeans")
    keep = labels >= 0 if cfg.noise == "drop" else np.ones(len(labels), bool)
    out_labels = np.where(labels >= 0, labels, n_clusters)[keep]
    summary = summarise(cfg, table, x, fit, labels, out_labels, params, pca_info)
    report({"stage": "write"})
    write_labels(cfg, [k for k, kept in zip(keys, keep, strict=True) if kept], out_labels, summary)
    write_plots(cfg, keys, z, fit, labels)
    log.info(
        "%d clusters (%s), noise %.1f%%, majority %.1f%% -> %s",
        n_clusters, params, 100 * summary["noise_share"], 100 * summary["majority_share"], cfg.out,
    )  # fmt: skip
    return {**summary, "out": open_store(cfg.out).url}


# ---------------------------------------------------------------- input


def _read(url: str) -> pa.Table:
    dataset = open_parquet(url)
    if "key" not in dataset.schema.names or "embedding" not in dataset.schema.names:
        raise ManifestError(f"{url} needs columns key and embedding (has {dataset.schema.names})")
    table = dataset.to_table().sort_by("key")
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    dup = np.flatnonzero(keys[1:] == keys[:-1])
    if len(dup):
        raise ManifestError(f"{url}: key {keys[dup[0]]!r} appears more than once")
    return table


def _fit_rows(table: pa.Table, where: str | None) -> np.ndarray:
    """A boolean mask of the rows ``where`` selects (all rows for None)."""
    n = table.num_rows
    if where is None:
        return np.ones(n, bool)
    plain = table.drop_columns(["embedding"]).append_column("__row", pa.array(np.arange(n)))
    try:
        expr = parse_where(where, plain.schema)
    except ManifestError as e:
        raise ManifestError(str(e).replace("--where", "--fit-where", 1)) from e
    rows = ds.dataset(plain).to_table(filter=expr, columns=["__row"]).column(0).to_numpy()
    mask = np.zeros(n, bool)
    mask[rows] = True
    if not mask.any():
        raise ManifestError(f"--fit-where {where!r} selects none of the {n} embeddings")
    return mask


def project(
    x: np.ndarray, fit: np.ndarray, components: int, seed: int, *, min_variance: float = 0.0
) -> tuple[np.ndarray, dict[str, Any]]:
    """PCA fitted on the ``fit`` rows, whitened, applied to every row, then L2-normalised.

    Of the ``components`` leading components, those explaining less than ``min_variance``
    of the fit rows' variance are dropped before whitening (the first is always kept).

    Raises:
        ClusterError: fewer fit rows than components + 1.
    """
    from sklearn.decomposition import PCA

    k = min(components, x.shape[1])
    if fit.sum() <= k:
        raise ClusterError(f"{int(fit.sum())} fit rows are too few for {k} PCA components")
    if k < components:
        log.info("the embeddings have %d dimensions: PCA keeps %d, not %d", k, k, components)
    pca = PCA(n_components=k, whiten=True, svd_solver="full", random_state=seed)
    x = x.astype(np.float64)  # once: 112,120 x 128 is 115 MB a copy
    pca.fit(x[fit])
    ratios = pca.explained_variance_ratio_
    kept = max(1, int((ratios >= min_variance).sum()))  # ratios are in decreasing order
    if kept < k:
        log.warning(
            "PCA: %d of %d components explain less than %.2g of the variance each (%.2g in "
            "all): dropped, not whitened up to the signal's scale; %d kept",
            k - kept, k, min_variance, float(ratios[kept:].sum()), kept,
        )  # fmt: skip
    z = pca.transform(x)[:, :kept]
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    info = {
        "components": kept,
        "components_dropped": k - kept,
        "min_variance": min_variance,
        "whiten": True,
        "explained_variance": float(ratios[:kept].sum()),
    }
    return z, info


# ---------------------------------------------------------------- methods


def _check_noise(cfg: ClusterConfig, fit_labels: np.ndarray, params: dict[str, Any]) -> None:
    """A searched radius must leave at most ``max_noise`` of the fit rows as noise (the
    search bounds the noise of the sample; small clusters dropped add to it)."""
    noise = float((fit_labels < 0).mean())
    if cfg.method != "kmeans" and cfg.eps is None and noise > cfg.max_noise:
        raise ClusterError(
            f"the {cfg.method} parameters giving {cfg.clusters} clusters ({params}) leave "
            f"{noise:.0%} of the fit rows as noise, over --max-noise {cfg.max_noise:.0%}: "
            "try --method kmeans, or another --clusters or --min-samples"
        )


def _sample(fit: np.ndarray, size: int, seed: int) -> np.ndarray:
    rows = np.flatnonzero(fit)
    if len(rows) > size:
        rows = np.sort(np.random.default_rng([seed, 7]).choice(rows, size, replace=False))
    return rows


def _kmeans(z: np.ndarray, fit: np.ndarray, cfg: ClusterConfig) -> tuple[np.ndarray, dict]:
    from sklearn.cluster import KMeans

    k = int(cfg.clusters or 0)
    if fit.sum() < k:
        raise ClusterError(f"{int(fit.sum())} fit rows cannot make {k} clusters")
    km = KMeans(n_clusters=k, n_init=4, random_state=cfg.seed).fit(z[fit])
    return km.predict(z).astype(np.int64), {"n_init": 4, "inertia": float(km.inertia_)}


def _dbscan(z: np.ndarray, fit: np.ndarray, cfg: ClusterConfig) -> tuple[np.ndarray, dict]:
    rows = _sample(fit, cfg.sample, cfg.seed)
    tree = dbscan.DensityTree.fit(z[rows], cfg.min_samples)
    radii, counts, noise = tree.curve(cfg.smallest_cluster)
    if cfg.eps is not None:
        eps, interval = cfg.eps, None
    else:
        found, seen = dbscan.search_radius(
            radii, counts, noise, int(cfg.clusters or 0), cfg.max_noise
        )
        if found is None:
            raise ClusterError(_unreachable(cfg, seen, len(rows), int(fit.sum()), tree))
        eps, interval = found.eps, [found.lo, found.hi]
    cores, labels = tree.core_labels(eps, cfg.smallest_cluster)
    params = {
        "eps": eps,
        "eps_interval": interval,
        "min_samples": cfg.min_samples,
        "min_cluster_size": cfg.smallest_cluster,
        "fit_sample": len(rows),
    }
    return dbscan.assign(z, tree.x[cores], labels, eps), params


def _hdbscan(z: np.ndarray, fit: np.ndarray, cfg: ClusterConfig) -> tuple[np.ndarray, dict]:
    """One HDBSCAN tree on the sample; its DBSCAN-like cuts searched for ``clusters``."""
    from sklearn.cluster import HDBSCAN

    rows = _sample(fit, cfg.sample, cfg.seed)
    size = cfg.smallest_cluster
    tree = HDBSCAN(min_cluster_size=max(size, 2), min_samples=cfg.min_samples, copy=True)
    tree.fit(z[rows])

    def at(cut: float) -> np.ndarray:
        return tree.dbscan_clustering(cut, min_cluster_size=size).astype(np.int64)

    cut = cfg.eps if cfg.eps is not None else _search_cut(cfg, z[rows], at, int(fit.sum()))
    labels = at(cut)
    members = labels >= 0
    params = {
        "cut": cut,
        "min_samples": cfg.min_samples,
        "min_cluster_size": size,
        "fit_sample": len(rows),
    }
    return dbscan.assign(z, z[rows][members], labels[members], cut), params


def _search_cut(
    cfg: ClusterConfig, sample: np.ndarray, at: Callable[[float], np.ndarray], n_fit: int
) -> float:
    """The largest cut giving ``clusters`` clusters, on a geometric grid of cuts.

    A cut's own labels leave border points out (DBSCAN*); the noise limit is checked once
    they are assigned, as every row will be, to the nearest clustered point within the cut.
    """
    seen = []
    # Rows are unit vectors, so no two are farther apart than 2: that cut joins everything.
    for cut in np.geomspace(1e-3, 2.0, N_CUTS):
        labels = at(float(cut))
        if labels.max() >= 0:
            seen.append(
                dbscan.Found(
                    eps=float(cut),
                    lo=float(cut),
                    hi=float(cut),
                    clusters=int(labels.max()) + 1,
                    noise=float((labels < 0).mean()),
                )
            )
    hits = [f for f in seen if f.clusters == cfg.clusters]
    if hits:
        labels, cut = at(hits[-1].eps), hits[-1].eps
        members = labels >= 0
        assigned = dbscan.assign(sample, sample[members], labels[members], cut)
        if (assigned < 0).mean() <= cfg.max_noise:
            return cut
    raise ClusterError(_unreachable(cfg, seen, len(sample), n_fit, None, at))


def _unreachable(
    cfg: ClusterConfig,
    seen: list[dbscan.Found],
    n_sample: int,
    n_fit: int,
    tree: dbscan.DensityTree | None,
    labels_at: Callable[[float], np.ndarray] | None = None,
) -> str:
    """One line: what the radii gave, the nearest to K, and what to try instead."""
    name, knob, knobs = (
        ("DBSCAN", "radius", "radii") if cfg.method == "dbscan" else ("HDBSCAN", "cut", "cuts")
    )
    head = (
        f"no {name} {knob} gives {cfg.clusters} clusters with at most {cfg.max_noise:.0%} noise "
        f"(min_samples {cfg.min_samples}, fitted on {n_sample:,} of {n_fit:,} rows)"
    )
    hint = (
        f"{name} has no cluster count: try --method kmeans (DeepCluster's choice), "
        "or another --clusters or --min-samples"
    )
    if not seen:
        return f"{head}: no {knob} kept the noise under the limit. {hint}"
    counts = sorted({f.clusters for f in seen})
    near = min(reversed(seen), key=lambda f: abs(f.clusters - int(cfg.clusters or 0)))
    if tree is not None:
        cores, core_labels = tree.core_labels(near.eps, cfg.smallest_cluster)
        labels = dbscan.assign(tree.x, tree.x[cores], core_labels, near.eps)
    else:
        labels = labels_at(near.eps) if labels_at is not None else np.zeros(0, np.int64)
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(1)
    largest = sizes.max() / max(len(labels), 1)
    return (
        f"{head}: {knobs} gave {counts[0]} to {counts[-1]} clusters; the nearest, "
        f"{near.clusters} clusters at {knob} {near.eps:.4g}, has its largest cluster at "
        f"{largest:.0%} of the rows and {near.noise:.0%} noise. {hint}"
    )


def number_by_size(raw: np.ndarray) -> np.ndarray:
    """Cluster ids renumbered 0, 1, ... by decreasing size (ties: the old id); -1 stays -1."""
    out = np.full(len(raw), -1, np.int64)
    members = raw >= 0
    if not members.any():
        return out
    ids, counts = np.unique(raw[members], return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    mapping = np.empty(int(ids.max()) + 1, np.int64)
    mapping[order] = np.arange(len(order))
    out[members] = mapping[raw[members]]
    return out
