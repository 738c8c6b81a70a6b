"""``cluster``: planted clusters found back, K unreachable fails clearly, PCA sees fit rows only."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score

from pneumo.pseudolabels import dbscan
from pneumo.pseudolabels.cluster import ClusterConfig, ClusterError, cluster
from pneumo.shards.errors import ConfigError, ManifestError


def planted(k: int, per: int, *, dim: int = 32, signal: int = 8, seed: int = 0) -> np.ndarray:
    """``k`` tight clusters whose centres span ``signal`` of ``dim`` dimensions; rows in
    cluster order (row i is in cluster i // per)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, signal)) * 3
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:signal]  # orthonormal rows
    x = np.repeat(centres, per, axis=0) @ basis
    return x + 0.15 * rng.normal(size=x.shape)


def write_embeddings(folder: Path | str, x: np.ndarray, **columns: list) -> list[str]:
    """``x`` as an embeddings dataset (key, embedding, extra columns) in two Parquet parts."""
    keys = [f"k{i:05d}" for i in range(len(x))]
    flat = pa.array(x.astype(np.float32).ravel())
    table = pa.table(
        {
            "key": keys,
            **columns,
            "embedding": pa.FixedSizeListArray.from_arrays(flat, x.shape[1]),
        }
    )
    half = len(x) // 2  # two parts, rows shuffled: cluster() must sort them itself
    folder = str(folder)
    Path(folder).mkdir(parents=True, exist_ok=True)
    pq.write_table(table.slice(half).take(np.arange(len(x) - half)[::-1]), f"{folder}/p1.parquet")
    pq.write_table(table.slice(0, half), f"{folder}/p0.parquet")
    return keys


def read_labels(url: str) -> dict[str, int]:
    table = ds.dataset(url, format="parquet").to_table()
    return dict(
        zip(table.column("key").to_pylist(), table.column("label").to_pylist(), strict=True)
    )


def ari(labels: dict[str, int], truth: np.ndarray) -> float:
    rows = [int(k[1:]) for k in labels]
    return adjusted_rand_score(truth[rows], list(labels.values()))


@pytest.mark.parametrize("method", ["dbscan", "hdbscan", "kmeans"])
def test_planted_clusters_are_found_back(tmp_path: Path, method: str) -> None:
    x = planted(6, 150)
    truth = np.repeat(np.arange(6), 150)
    write_embeddings(tmp_path / "emb", x)
    out = str(tmp_path / "labels")
    summary = cluster(
        ClusterConfig(embeddings=str(tmp_path / "emb"), out=out, clusters=6, pca=8, method=method)
    )
    labels = read_labels(out)
    assert summary["clusters"] == 6
    assert len(labels) >= 0.9 * len(x)  # little noise dropped
    assert ari(labels, truth) >= 0.9
    # Numbered by size, the sizes and shares in _clusters.json agree with the table.
    meta = json.loads((Path(out) / "_clusters.json").read_text())
    counts = np.bincount(list(labels.values()))
    assert meta["sizes"] == counts.tolist() == sorted(counts, reverse=True)
    assert meta["majority_share"] == pytest.approx(counts.max() / len(labels))
    assert meta["noise_share"] == pytest.approx(1 - len(labels) / len(x))
    assert len(meta["embeddings_fingerprint"]) == 16
    assert (Path(out) / "_scatter.png").read_bytes()[:4] == b"\x89PNG"


def test_near_empty_components_are_dropped_not_whitened(tmp_path: Path) -> None:
    # Three clusters in 2 of 8 dimensions; the other 6 hold a trace (1e-4 of the variance
    # each, as a collapsed latent dimension) of an unrelated grouping. Whitened, those 6
    # would outweigh the 2 signal directions and k-means would find the unrelated grouping.
    rng = np.random.default_rng(3)
    centres = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 4.0]])
    truth = np.repeat(np.arange(3), 60)
    signal = centres[truth] + 0.3 * rng.normal(size=(180, 2))
    unrelated = rng.permutation(truth)
    trace = 0.02 * (rng.normal(size=(3, 6))[unrelated] + 0.1 * rng.normal(size=(180, 6)))
    x = np.hstack([signal, trace])
    write_embeddings(tmp_path / "emb", x)
    base = dict(embeddings=str(tmp_path / "emb"), clusters=3, pca=8, method="kmeans")
    summary = cluster(ClusterConfig(**base, out=str(tmp_path / "kept")))
    assert ari(read_labels(str(tmp_path / "kept")), truth) >= 0.95
    assert summary["pca"]["components"] == 2 and summary["pca"]["components_dropped"] == 6
    # With every component whitened (the behaviour this guards against) the clusters are lost.
    cluster(ClusterConfig(**base, out=str(tmp_path / "all"), min_variance=0.0))
    assert ari(read_labels(str(tmp_path / "all")), truth) < 0.6


def test_dbscan_fitted_on_a_sample_labels_every_row(tmp_path: Path) -> None:
    x = planted(4, 300, seed=1)
    truth = np.repeat(np.arange(4), 300)
    write_embeddings(tmp_path / "emb", x)
    cfg = ClusterConfig(
        embeddings=str(tmp_path / "emb"), out=str(tmp_path / "l"), clusters=4, pca=8, sample=300
    )
    summary = cluster(cfg)
    labels = read_labels(cfg.out)
    assert summary["parameters"]["fit_sample"] == 300
    assert len(labels) >= 0.95 * len(x)  # rows outside the sample got their cluster
    assert ari(labels, truth) >= 0.9


def test_the_radius_curve_is_sklearns_dbscan() -> None:
    """Clusters and noise at a radius equal sklearn's DBSCAN with the same min_samples
    (which counts the point itself); only border points may go to another cluster."""
    rng = np.random.default_rng(3)
    x = np.concatenate([planted(5, 120, dim=10, signal=10, seed=3), rng.uniform(-6, 6, (80, 10))])
    tree = dbscan.DensityTree.fit(x, 10)
    radii, counts, noise = tree.curve()
    for eps in np.quantile(tree.core, [0.2, 0.5, 0.8, 0.95]):
        theirs = DBSCAN(eps=eps, min_samples=10).fit_predict(x)
        cores, core_labels = tree.core_labels(eps)
        ours = dbscan.assign(x, x[cores], core_labels, eps)
        i = np.searchsorted(radii, eps, "right") - 1
        assert counts[i] == theirs.max() + 1 == ours.max() + 1
        assert noise[i] == pytest.approx((theirs < 0).mean())
        np.testing.assert_array_equal(ours < 0, theirs < 0)
        assert adjusted_rand_score(theirs, ours) > 0.98


def test_unreachable_k_fails_with_what_it_found(tmp_path: Path) -> None:
    # One Gaussian cloud: every radius gives one cluster plus noise.
    x = np.random.default_rng(0).normal(size=(600, 16))
    write_embeddings(tmp_path / "emb", x)
    out = tmp_path / "labels"
    cfg = ClusterConfig(embeddings=str(tmp_path / "emb"), out=str(out), clusters=14, pca=8)
    with pytest.raises(ClusterError) as caught:
        cluster(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert "no DBSCAN radius gives 14 clusters" in message
    assert "largest cluster at" in message and "noise" in message
    assert "--method kmeans" in message
    assert not out.exists() or not list(out.iterdir())  # nothing half-written
    # k-means, as suggested, gives the 14.
    summary = cluster(
        ClusterConfig(embeddings=cfg.embeddings, out=cfg.out, clusters=14, pca=8, method="kmeans")
    )
    assert summary["clusters"] == 14


def test_pca_is_fitted_on_the_fit_rows_only(tmp_path: Path) -> None:
    """Train rows: three clusters in the first two dimensions. Test rows: a huge spread along
    the third. Fitted on train only, PCA keeps the first two and the clusters; fitted on all
    rows it would take the third, and the train rows' clusters would mix."""
    rng = np.random.default_rng(0)
    angles = np.repeat([0.0, 2.1, 4.2], 100)
    train = np.stack([np.cos(angles), np.sin(angles), np.zeros(300)], 1) * 4
    train += 0.3 * rng.normal(size=train.shape)
    test = np.stack([np.zeros(300), np.zeros(300), rng.normal(0, 60, 300)], 1)
    test[:, :2] = rng.normal(0, 4, (300, 2))
    split = ["train"] * 300 + ["test"] * 300
    keys = write_embeddings(tmp_path / "emb", np.concatenate([train, test]), split=split)
    truth = np.concatenate([np.repeat([0, 1, 2], 100), np.full(300, -1)])

    def train_ari(fit_where: str | None, out: str) -> float:
        cfg = ClusterConfig(
            embeddings=str(tmp_path / "emb"), out=str(tmp_path / out), clusters=3, pca=2,
            method="kmeans", fit_where=fit_where,
        )  # fmt: skip
        summary = cluster(cfg)
        labels = read_labels(cfg.out)
        assert summary["fit_rows"] == (300 if fit_where else 600)
        assert len(labels) == 600  # non-fit rows are labelled too
        return adjusted_rand_score(truth[:300], [labels[k] for k in keys[:300]])

    assert train_ari("split == 'train'", "fit-train") == pytest.approx(1.0)
    assert train_ari(None, "fit-all") < 0.8  # what including the test rows would do


def test_noise_is_dropped_or_made_a_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = np.concatenate([planted(3, 200, seed=5), rng.uniform(-12, 12, (60, 32))])
    write_embeddings(tmp_path / "emb", x)
    base = dict(embeddings=str(tmp_path / "emb"), clusters=3, pca=8)
    dropped = cluster(ClusterConfig(out=str(tmp_path / "drop"), **base))
    kept = cluster(ClusterConfig(out=str(tmp_path / "class"), noise="class", **base))
    assert dropped["noise_rows"] == kept["noise_rows"] > 0
    assert len(read_labels(str(tmp_path / "drop"))) == 660 - dropped["noise_rows"]
    labels = read_labels(str(tmp_path / "class"))
    assert len(labels) == 660 and kept["noise_label"] == 3
    assert sum(v == 3 for v in labels.values()) == kept["noise_rows"]
    # The planted background is (mostly) what is called noise.
    background = {f"k{i:05d}" for i in range(600, 660)}
    called = {k for k, v in labels.items() if v == 3}
    assert len(called & background) >= 0.8 * len(called)


def test_bad_inputs_are_one_clear_error(tmp_path: Path) -> None:
    write_embeddings(tmp_path / "emb", planted(3, 20))
    emb = str(tmp_path / "emb")
    with pytest.raises(ManifestError, match="--fit-where .*unknown column 'split'"):
        cluster(ClusterConfig(embeddings=emb, out=str(tmp_path / "o"), fit_where="split == 'x'"))
    with pytest.raises(ManifestError, match="holds no Parquet part"):
        (tmp_path / "empty").mkdir()
        cluster(ClusterConfig(embeddings=str(tmp_path / "empty"), out=str(tmp_path / "o2")))
    with pytest.raises(ConfigError, match="--method"):
        ClusterConfig(embeddings=emb, out="o", method="spectral")
    with pytest.raises(ConfigError, match="needs --clusters"):
        ClusterConfig(embeddings=emb, out="o", method="kmeans", clusters=None)
    (tmp_path / "ragged").mkdir()
    ragged = pa.table({"key": ["a", "b"], "embedding": [[1.0, 2.0], [1.0]]})
    pq.write_table(ragged, tmp_path / "ragged" / "part-0.parquet")
    with pytest.raises(ManifestError, match="row 1 has a embedding of 1 values"):
        cluster(ClusterConfig(embeddings=str(tmp_path / "ragged"), out=str(tmp_path / "o")))


def test_montage_shows_each_clusters_images_from_the_shards(tmp_path: Path, dataset) -> None:
    """Embeddings of the 40 real images of the training fixture: two clusters, planted."""
    keys = sorted(r["key"] for r in dataset.rows)
    x = planted(2, 20, seed=2)
    table = pa.table(
        {
            "key": keys,
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(x.astype(np.float32).ravel()), 32
            ),
        }
    )
    (tmp_path / "emb").mkdir()
    pq.write_table(table, tmp_path / "emb" / "part-0.parquet")
    cfg = ClusterConfig(
        embeddings=str(tmp_path / "emb"), out=str(tmp_path / "l"), clusters=2, pca=4,
        method="kmeans", dataset=dataset.url, montage_images=4,
    )  # fmt: skip
    cluster(cfg)
    png = (tmp_path / "l" / "_montage.png").read_bytes()
    montage = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert montage is not None and montage.shape[0] > 100 and montage.shape[1] > 200
    # Chest X-rays, not blank tiles: the montage has plenty of mid-grey pixels.
    assert ((montage > 30) & (montage < 220)).mean() > 0.2


def test_labels_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    import boto3

    write_embeddings(tmp_path / "emb", planted(3, 50))
    client = boto3.client("s3")
    bucket = s3_bucket[len("s3://") :]
    for part in sorted((tmp_path / "emb").iterdir()):
        client.upload_file(str(part), bucket, f"emb/{part.name}")
    out = f"{s3_bucket}/labels"
    summary = cluster(
        ClusterConfig(embeddings=f"{s3_bucket}/emb", out=out, clusters=3, pca=8, method="kmeans")
    )
    names = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="labels/")["Contents"]}
    assert {"labels/part-0.parquet", "labels/_clusters.json", "labels/_scatter.png"} <= names
    assert summary["labelled_rows"] == 150
