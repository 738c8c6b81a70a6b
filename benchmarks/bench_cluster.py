"""Clustering at ChestX-ray14 scale: pneumo's bounded-memory DBSCAN against scikit-learn's.

Synthetic embeddings with 14 planted clusters, two parts in one run:

1. the same L2-normalised 50-D features (what ``pneumo cluster`` clusters after PCA) at
   growing sizes: ``sklearn.cluster.DBSCAN`` (every neighbourhood materialised) against
   :mod:`pneumo.pseudolabels.dbscan` (radius searched for 14 clusters on a sample of at most
   ``--sample`` rows, every row assigned to its nearest core point), at the radius ours
   found; wall time, peak memory above the process's before the call, and the adjusted
   Rand index between the two labelings;
2. the whole command at full scale: ``cluster()`` on 112,120 x 128 embeddings in Parquet
   (read, PCA to 50 fitted on the train rows, DBSCAN searched for 14 clusters, LABELS and
   plots written), and k-means for comparison.

Each measurement runs in a fresh child process, so peak memory (``ru_maxrss``) is its own.

    python benchmarks/bench_cluster.py [--sizes 5000 10000 20000 40000] [--full 112120]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

K = 14
MIN_SAMPLES = 10


def features(n: int, dim: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around ``K`` random centres, and their cluster numbers."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, dim))
    truth = rng.integers(0, K, n)
    x = centres[truth] + 0.35 * rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), truth


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    before, cpu = _peak_mb(), _cpu_s()
    start = time.perf_counter()
    try:
        result = fn(*args)
        queue.put({
            "seconds": time.perf_counter() - start, "cpu_s": _cpu_s() - cpu,
            "peak_mb": _peak_mb() - before, **result,
        })  # fmt: skip
    except MemoryError:
        queue.put({"error": "MemoryError"})


def measure(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a forked child: its result, seconds and extra peak memory."""
    queue = mp.get_context("fork").Queue()
    proc = mp.get_context("fork").Process(target=_child, args=(fn, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def ours(n: int, sample: int) -> dict[str, Any]:
    from pneumo.pseudolabels import dbscan

    x, _ = features(n)
    rows = np.sort(np.random.default_rng(1).choice(n, min(n, sample), replace=False))
    tree = dbscan.DensityTree.fit(x[rows], MIN_SAMPLES)
    found, _ = dbscan.search_radius(*tree.curve(MIN_SAMPLES), K, 0.5)
    if found is None:
        return {"eps": None, "labels": None}
    cores, labels = tree.core_labels(found.eps, MIN_SAMPLES)
    return {"eps": found.eps, "labels": dbscan.assign(x, tree.x[cores], labels, found.eps)}


def sklearns(n: int, eps: float) -> dict[str, Any]:
    from sklearn.cluster import DBSCAN

    x, _ = features(n)
    return {"labels": DBSCAN(eps=eps, min_samples=MIN_SAMPLES).fit_predict(x)}


def compare(sizes: list[int], sample: int) -> None:
    from sklearn.metrics import adjusted_rand_score

    print(f"\n1. DBSCAN on n x 50 unit vectors, {K} planted clusters, min_samples {MIN_SAMPLES}")
    print("  s: wall seconds (CPU seconds, all threads); MB: peak memory above the start")
    print(f"{'n':>8} {'ours s':>13} {'ours MB':>8} {'sklearn s':>13} {'sklearn MB':>11} "
          f"{'mem x':>7} {'ARI':>6} {'ARI truth':>9}")  # fmt: skip
    for n in sizes:
        a = measure(ours, n, sample)
        if a.get("eps") is None:
            print(f"{n:>8} ours found no radius for {K} clusters")
            continue
        b = measure(sklearns, n, a["eps"])
        truth = features(n)[1]
        agree = adjusted_rand_score(b["labels"], a["labels"]) if "labels" in b else float("nan")
        if "error" in b:
            print(f"{n:>8} sklearn: {b['error']}")
            continue
        print(
            f"{n:>8} {_time(a):>13} {a['peak_mb']:>8.0f} {_time(b):>13} {b['peak_mb']:>11.0f} "
            f"{b['peak_mb'] / max(a['peak_mb'], 1):>7.1f} {agree:>6.3f} "
            f"{adjusted_rand_score(truth, a['labels']):>9.3f}"
        )


def _time(r: dict[str, Any]) -> str:
    return f"{r['seconds']:.1f} ({r['cpu_s']:.1f})"


def full_run(n: int, method: str, folder: str) -> dict[str, Any]:
    from pneumo.pseudolabels.cluster import ClusterConfig, cluster
    from pneumo.shards import selections

    out = f"{folder}/labels-{method}"
    summary = cluster(
        ClusterConfig(
            embeddings=f"{folder}/emb",
            out=out,
            pca=50,
            clusters=K,
            method=method,
            fit_where=selections.TRAIN,
        )  # fmt: skip
    )
    return {k: summary[k] for k in ("clusters", "noise_share", "majority_share", "parameters")}


def write_embeddings(folder: str, n: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(K, 128)) * 2
    truth = rng.integers(0, K, n)
    x = (centres[truth] + rng.normal(size=(n, 128))).astype(np.float32)
    keys = [f"{i:08d}_000" for i in range(n)]
    split = np.where(rng.random(n) < 0.77, "train", "test")
    table = pa.table(
        {
            "key": keys,
            "split": split,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 128),
        }
    )
    Path(f"{folder}/emb").mkdir(parents=True)
    pq.write_table(table, f"{folder}/emb/part-0.parquet")
    return truth


def full(n: int, methods: list[str]) -> None:
    import pyarrow.dataset as ds
    from sklearn.metrics import adjusted_rand_score

    print(f"\n2. pneumo cluster on {n:,} x 128 embeddings (PCA 50 on the train rows, K={K})")
    with tempfile.TemporaryDirectory() as folder:
        truth = write_embeddings(folder, n)
        for method in methods:
            r = measure(full_run, n, method, folder)
            labels = ds.dataset(f"{folder}/labels-{method}", format="parquet").to_table()
            rows = [int(k[:8]) for k in labels.column("key").to_pylist()]
            ari = adjusted_rand_score(truth[rows], labels.column("label").to_numpy())
            print(
                f"{method:>8}: {_time(r)} s, peak +{r['peak_mb']:.0f} MB, "
                f"{r['clusters']} clusters, noise {r['noise_share']:.1%}, ARI {ari:.3f}, "
                f"{r['parameters']}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[5000, 10000, 20000, 40000])
    parser.add_argument("--sample", type=int, default=20_000)
    parser.add_argument("--full", type=int, default=112_120)
    parser.add_argument("--methods", nargs="*", default=["dbscan", "kmeans"])
    args = parser.parse_args()
    if args.sizes:
        compare(args.sizes, args.sample)
    if args.full:
        full(args.full, args.methods)


if __name__ == "__main__":
    main()
