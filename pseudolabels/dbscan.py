"""DBSCAN in bounded memory, with the radius searched for a wanted number of clusters.

scikit-learn's ``DBSCAN`` materialises every point's neighbourhood (about 1.4 GB at
40,000 x 50-D, measured), and has no cluster count. This module computes the same
clustering from three arrays of one number per point, never a neighbourhood list:

* the *core distance* of a point: the distance to its ``min_samples``-th nearest point,
  itself included (DBSCAN's "core point at radius eps" is ``core <= eps``);
* the minimum spanning tree of the *mutual reachability* distance
  ``max(core(a), core(b), d(a, b))`` (HDBSCAN's construction, Prim's algorithm, one row of
  distances at a time): the core points at radius ``eps`` fall into the same clusters as
  the tree's edges of weight ``<= eps`` join them, for every ``eps`` at once;
* the *reach* of a point: the smallest radius at which it is within ``eps`` of a core
  point, i.e. not noise (``min_b max(core(b), d(a, b))``).

So the number of clusters at radius ``eps`` is ``#{core <= eps} - #{tree edges <= eps}`` and
the noise share is ``#{reach > eps} / n``: the whole curve over ``eps`` comes from sorting,
and :func:`search_radius` reads the radii that give K clusters off it. Memory is a block of
``chunk x n`` distances; time is O(n^2 d), so :mod:`pneumo.pseudolabels.cluster` fits on a
sample of a few ten thousand points and :func:`assign` gives every other point the cluster of its
nearest core point within ``eps`` (what DBSCAN does with a border point).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

CHUNK = 1024  # rows of a distance block: CHUNK x n float64 (160 MB at n = 20,000)


def _blocks(n: int, chunk: int) -> Iterator[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _squared_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of ``a`` and ``b`` (``b_sq``: b's norms²)."""
    d2 = a @ b.T  # the only block allocated: the rest is in place
    d2 *= -2.0
    d2 += (a * a).sum(1)[:, None]
    d2 += b_sq[None, :]
    return np.maximum(d2, 0.0, out=d2)


def core_and_reach(x: np.ndarray, min_samples: int, chunk: int = CHUNK) -> tuple[np.ndarray, ...]:
    """Each row's core distance (to its ``min_samples``-th nearest row, itself counted, as
    sklearn counts) and reach (the smallest radius at which it is not noise).

    The reach only needs the ``min_samples`` nearest rows: a farther row ``b`` has
    ``d(a, b) > core(a)``, and ``a`` itself already offers ``core(a)``.
    """
    n = len(x)
    k = min(min_samples, n)
    sq = (x * x).sum(1)
    core, near, near_d = np.empty(n), np.empty((n, k), np.int64), np.empty((n, k))
    for rows in _blocks(n, chunk):
        d2 = _squared_distances(x[rows], x, sq)
        idx = np.argpartition(d2, k - 1, axis=1)[:, :k]
        near[rows] = idx
        near_d[rows] = np.sqrt(np.take_along_axis(d2, idx, axis=1))
        core[rows] = near_d[rows].max(1)
    reach = np.maximum(near_d, core[near]).min(1)
    return core, reach


def mutual_reachability_mst(x: np.ndarray, core: np.ndarray) -> tuple[np.ndarray, ...]:
    """The minimum spanning tree of the mutual reachability distance (Prim, O(n) memory).

    The points not yet in the tree are kept at the front of working copies (a joining point
    is swapped with the last one), so each step touches only them: n²/2 distances in all.

    Returns:
        ``(u, v, w)``: the n - 1 edges (indices into ``x``) and their weights.
    """
    n = len(x)
    pts, core = np.array(x, dtype=np.float64), np.array(core, dtype=np.float64)
    sq, ids = (pts * pts).sum(1), np.arange(n)
    best, parent = np.full(n, np.inf), np.zeros(n, np.int64)
    u, v, w = np.empty(n - 1, np.int64), np.empty(n - 1, np.int64), np.empty(n - 1)
    current, m = n - 1, n  # start from the last point: its removal needs no swap
    for i in range(n - 1):
        vec, vec_sq, vec_core, vec_id = (
            pts[current].copy(),
            sq[current],
            core[current],
            ids[current],
        )
        m -= 1
        _swap(current, m, pts, sq, core, ids, best, parent)
        d = pts[:m] @ vec
        d *= -2.0
        d += sq[:m] + vec_sq
        np.sqrt(np.maximum(d, 0.0, out=d), out=d)
        np.maximum(d, np.maximum(core[:m], vec_core), out=d)
        better = d < best[:m]
        best[:m][better] = d[better]
        parent[:m][better] = vec_id
        current = int(np.argmin(best[:m]))
        u[i], v[i], w[i] = parent[current], ids[current], best[current]
    return u, v, w


def _swap(i: int, j: int, *arrays: np.ndarray) -> None:
    if i != j:
        for a in arrays:
            a[[i, j]] = a[[j, i]]


@dataclass(frozen=True, kw_only=True)
class DensityTree:
    """What a DBSCAN fit keeps: the fitted points and the three curves of the module doc."""

    x: np.ndarray
    core: np.ndarray
    reach: np.ndarray
    mst: tuple[np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def fit(cls, x: np.ndarray, min_samples: int) -> DensityTree:
        x = np.ascontiguousarray(x, dtype=np.float64)
        core, reach = core_and_reach(x, min_samples)
        return cls(x=x, core=core, reach=reach, mst=mutual_reachability_mst(x, core))

    def curve(self, min_size: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(radii, clusters, noise)``: from each radius to the next, the number of clusters
        of at least ``min_size`` core points and the noise share (a lower bound when
        ``min_size > 1``: the small clusters' points are counted as clustered) are constant.

        Without a size floor, DBSCAN's count jitters: a point turning core before any of its
        neighbours does is a cluster of one for a moment, and on one Gaussian cloud such
        fragments add up to any K at some radius.
        """
        n = len(self.x)
        u, v, w = self.mst
        # Events in radius order; a point turns core (kind 0) before its tree edges join it.
        radius = np.concatenate([self.core, w])
        kind = np.concatenate([np.zeros(n, np.int8), np.ones(n - 1, np.int8)])
        order = np.lexsort((kind, radius))
        after = _count_big_components(order, n, u, v, min_size)
        event_radii = radius[order]
        radii = np.unique(np.concatenate([self.core, w, self.reach]))
        last = np.searchsorted(event_radii, radii, "right") - 1
        clusters = np.where(last >= 0, after[np.maximum(last, 0)], 0)
        noise = 1.0 - np.searchsorted(np.sort(self.reach), radii, "right") / n
        return radii, clusters, noise

    def core_labels(self, eps: float, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The core points at radius ``eps`` in clusters of at least ``min_size`` core points
        (indices), and their cluster numbers."""
        cores = np.flatnonzero(self.core <= eps)
        u, v, w = self.mst
        keep = w <= eps
        n = len(self.x)
        graph = coo_matrix((np.ones(int(keep.sum())), (u[keep], v[keep])), shape=(n, n))
        _, components = connected_components(graph, directed=False)
        _, labels, sizes = np.unique(components[cores], return_inverse=True, return_counts=True)
        big = sizes[labels] >= min_size
        _, labels = np.unique(labels[big], return_inverse=True)
        return cores[big], labels


def _count_big_components(
    order: np.ndarray, n: int, u: np.ndarray, v: np.ndarray, min_size: int
) -> np.ndarray:
    """After each event of ``order`` (< n: point i turns core; else tree edge i - n joins its
    two ends), the number of components of at least ``min_size`` core points (union-find)."""
    parent = list(range(n))
    size = [1] * n
    big = 0
    out = np.empty(len(order), np.int64)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for j, event in enumerate(order.tolist()):
        if event < n:
            big += min_size <= 1
        else:
            a, b = root(int(u[event - n])), root(int(v[event - n]))
            big -= (size[a] >= min_size) + (size[b] >= min_size)
            parent[b] = a
            size[a] += size[b]
            big += size[a] >= min_size
        out[j] = big
    return out


def assign(
    x: np.ndarray, centres: np.ndarray, labels: np.ndarray, eps: float, chunk: int = CHUNK
) -> np.ndarray:
    """Each row of ``x`` gets the label of its nearest row of ``centres`` within ``eps``, or -1."""
    centres = np.ascontiguousarray(centres, dtype=np.float64)
    sq = (centres * centres).sum(1)
    out = np.full(len(x), -1, np.int64)
    if not len(centres):
        return out
    for rows in _blocks(len(x), chunk):
        d2 = _squared_distances(np.asarray(x[rows], dtype=np.float64), centres, sq)
        nearest = d2.argmin(1)
        close = np.sqrt(d2[np.arange(len(nearest)), nearest]) <= eps
        out[rows] = np.where(close, labels[nearest], -1)
    return out


@dataclass(frozen=True, kw_only=True)
class Found:
    """One radius tried, inside an interval ``[lo, hi)`` of radii that give the same
    clusters and noise on the fitted points."""

    eps: float
    lo: float
    hi: float
    clusters: int
    noise: float


def search_radius(
    radii: np.ndarray, clusters: np.ndarray, noise: np.ndarray, k: int, max_noise: float
) -> tuple[Found | None, list[Found]]:
    """The radius giving ``k`` clusters with at most ``max_noise`` noise, and what was seen.

    Of the radius intervals giving ``k`` clusters, the last (largest radii: least noise) is
    taken, at 90% of its width: inside, away from the radius where two clusters merge.

    Returns:
        ``(chosen or None, one Found per interval within the noise limit)``.
    """
    seen = []
    for i in range(len(radii) - 1):
        lo, hi = float(radii[i]), float(radii[i + 1])
        if noise[i] <= max_noise:
            found = Found(
                eps=lo + 0.9 * (hi - lo),
                lo=lo,
                hi=hi,
                clusters=int(clusters[i]),
                noise=float(noise[i]),
            )
            seen.append(found)
    hits = [f for f in seen if f.clusters == k]
    return (hits[-1] if hits else None), seen
