"""What bf16 embedding does to the pseudo-labels: the same images embedded in fp32 and in
bf16 autocast, each clustered by ``pneumo cluster``'s PCA -> DBSCAN, the labels compared.

    python benchmarks/bench_embed_precision.py [--per-kind 150] [--kinds 4] [--steps 150]

On the CPU (torch autocasts bfloat16 there too; a GPU's bf16 convolutions round the same
format, with other kernels). The run, top to bottom:

1. a dataset of synthetic chest radiographs (:func:`pneumo.synthetic.chest.synth_chest`) in
   ``--kinds`` planted groups that differ the way archives do (exposure, a mirrored image,
   a tighter field of view, a flat contrast), each image also varying on its own;
2. a β-VAE trained on it by ``train_autoencode`` (the loop, fp32 on the CPU), 64 px;
3. ``embed`` of every image: fp32, fp32 again (a run-to-run baseline: must be identical),
   and bf16;
4. ``cluster`` of each (PCA to 50 whitened and L2-normalised, DBSCAN with its radius searched
   for ``--kinds`` clusters, noise kept as a class), and of bf16 at the radius fp32's search
   found (the embedding shift alone, without the search moving the radius);
5. printed: the embeddings' difference, and for each bf16 clustering the adjusted Rand index
   against fp32's labels and the share of images whose label changed (clusters matched
   one-to-one first, since their numbers follow their sizes; noise is its own label).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.dataset as ds
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check import write_samples  # noqa: E402
from pneumo.pseudolabels.cluster import ClusterConfig, ClusterError, cluster  # noqa: E402
from pneumo.pseudolabels.embed import EmbedConfig, embed  # noqa: E402
from pneumo.synthetic.chest import synth_chest  # noqa: E402
from pneumo.training.autoencode import AutoencodeConfig, train_autoencode  # noqa: E402

SIZE = 64


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--per-kind", type=int, default=150, help="images of each planted kind")
    p.add_argument("--kinds", type=int, default=4, choices=range(2, 5))
    p.add_argument("--steps", type=int, default=150, help="autoencoder training steps")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--min-samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args()


# ---------------------------------------------------------------- the images


def planted_image(rng: np.random.Generator, kind: int) -> np.ndarray:
    """A synthetic chest of one of four kinds, with its own exposure jitter."""
    img = synth_chest(rng, SIZE * 2)[0].astype(np.float32)
    if kind == 1:  # mirrored, under-exposed
        img = img[:, ::-1] - 35
    elif kind == 2:  # a tighter field of view
        c = SIZE // 4
        img = cv2.resize(img[c : 2 * SIZE - c, c : 2 * SIZE - c], (2 * SIZE, 2 * SIZE))
    elif kind == 3:  # flat contrast, over-exposed
        img = 0.55 * (img - 110) + 150
    img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 6)  # each image's own exposure
    small = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return np.clip(small, 0, 255).astype(np.uint8)


def write_planted(root: Path, kinds: int, per_kind: int, seed: int) -> dict[str, int]:
    """The dataset (NIH-like, unlabelled, all train) and each key's kind."""
    rng = np.random.default_rng(seed)
    truth, samples = {}, []
    for i in range(kinds * per_kind):
        kind, key = i % kinds, f"p{i:05d}"
        png = cv2.imencode(".png", planted_image(rng, kind))[1].tobytes()
        truth[key] = kind
        samples.append({"key": key, "split": "train" if i % 5 else "val", "has_ptx": None,
                        "image": png, "format": "png", "side": SIZE})  # fmt: skip
    write_samples(root, samples, dataset="nih")
    return truth


# ---------------------------------------------------------------- the comparison


def labels_of(out: str) -> dict[str, int]:
    table = ds.dataset(out, format="parquet").to_table()
    return dict(zip(table["key"].to_pylist(), table["label"].to_pylist(), strict=True))


def vectors_of(out: str) -> tuple[list[str], np.ndarray]:
    table = ds.dataset(out, format="parquet").to_table().sort_by("key")
    return table["key"].to_pylist(), np.stack(table["embedding"].to_numpy(zero_copy_only=False))


def changed_share(a: np.ndarray, b: np.ndarray) -> float:
    """The share of items whose label differs once ``b``'s labels are matched one-to-one to
    ``a``'s (the matching that keeps most items; the numbering of clusters is arbitrary)."""
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    table = np.zeros((len(ua), len(ub)), np.int64)
    np.add.at(table, (ia, ib), 1)
    rows, cols = linear_sum_assignment(-table)
    return 1.0 - table[rows, cols].sum() / len(a)


def compare(reference: dict[str, int], other: dict[str, int]) -> dict[str, float]:
    keys = sorted(reference)
    a = np.array([reference[k] for k in keys])
    b = np.array([other[k] for k in keys])
    return {
        "ari": round(float(adjusted_rand_score(a, b)), 4),
        "changed_share": round(changed_share(a, b), 4),
        "changed_images": int(round(changed_share(a, b) * len(a))),
    }


def clustered(emb: str, out: str, args: argparse.Namespace, eps: float | None = None) -> dict:
    """``pneumo cluster``'s DBSCAN of ``emb``: its summary and labels, or the error."""
    cfg = ClusterConfig(
        embeddings=emb, out=out, clusters=args.kinds, method="dbscan",
        min_samples=args.min_samples, noise="class", eps=eps, seed=args.seed,
    )  # fmt: skip
    try:
        summary = cluster(cfg)
    except ClusterError as e:
        return {"error": str(e)}
    return {"summary": summary, "labels": labels_of(out)}


def embeddings(tmp: Path, args: argparse.Namespace) -> tuple[dict[str, int], dict[str, str]]:
    """The planted dataset, a VAE trained on it, and its embeddings: each key's kind, and
    the EMBEDDINGS folder of each of fp32, fp32 again, bf16."""
    data, ae = str(tmp / "data"), str(tmp / "ae")
    truth = write_planted(Path(data), args.kinds, args.per_kind, args.seed)
    train_autoencode(AutoencodeConfig(
        dataset=data, out=ae, kind="vae", size=SIZE, latent_dim=args.latent_dim,
        batch_size=32, epochs=3, steps_per_epoch=max(1, args.steps // 3), workers=0,
        lr=1e-3, seed=args.seed,
    ))  # fmt: skip
    out = {}
    for name, precision in (("fp32", "fp32"), ("fp32_again", "fp32"), ("bf16", "bf16")):
        out[name] = str(tmp / f"emb-{name}")
        embed(EmbedConfig(run=ae, dataset=data, out=out[name], workers=0, precision=precision))
    return truth, out


def shift(embs: dict[str, str]) -> dict[str, Any]:
    """How far bf16 moved the codes (and whether fp32 is deterministic)."""
    _, x32 = vectors_of(embs["fp32"])
    _, again = vectors_of(embs["fp32_again"])
    _, x16 = vectors_of(embs["bf16"])
    diff = np.abs(x16 - x32)
    rel = np.linalg.norm(x16 - x32, axis=1) / np.maximum(np.linalg.norm(x32, axis=1), 1e-12)
    return {
        "fp32_twice_identical": bool(np.array_equal(x32, again)),
        "bf16_max_abs_diff": float(diff.max()),
        "bf16_max_abs_diff_over_max_abs_code": float(diff.max() / np.abs(x32).max()),
        "bf16_median_relative_l2": float(np.median(rel)),
    }


def clusterings(tmp: Path, truth: dict[str, int], embs: dict[str, str], args) -> dict:
    """fp32's clustering, and bf16's and fp32-again's compared with it."""
    ref = clustered(embs["fp32"], str(tmp / "lab-fp32"), args)
    if "error" in ref:
        return {"fp32": {"error": ref["error"]}}
    eps = ref["summary"]["parameters"]["eps"]
    interval = [round(x, 4) for x in ref["summary"]["parameters"]["eps_interval"]]
    out = {
        "fp32": {
            **_shape(ref),
            "eps_interval": interval,  # the radii giving K clusters; eps at 90% of it
            "ari_vs_planted_kinds": compare(truth, ref["labels"])["ari"],
        }
    }
    runs = {
        "bf16_radius_searched": ("bf16", None),
        "bf16_at_fp32_radius": ("bf16", eps),
        "fp32_again": ("fp32_again", None),
    }
    for name, (emb, fixed) in runs.items():
        got = clustered(embs[emb], str(tmp / f"lab-{name}"), args, eps=fixed)
        if "error" in got:
            out[name] = {"error": got["error"]}
        else:
            out[name] = {**_shape(got), **compare(ref["labels"], got["labels"])}
    return out


def _shape(c: dict) -> dict[str, Any]:
    s = c["summary"]
    return {"clusters": s["clusters"], "eps": round(s["parameters"]["eps"], 4),
            "noise_share": round(s["noise_share"], 4)}  # fmt: skip


def report(f: dict[str, Any]) -> None:
    print(
        f"{f['images']} images of {f['kinds']} planted kinds, β-VAE codes of {f['latent_dim']}; "
        f"bf16 = torch.autocast('cpu', torch.bfloat16) on the CPU"
    )
    print(
        f"codes: fp32 twice identical: {f['fp32_twice_identical']}; bf16 vs fp32: max |diff| "
        f"{f['bf16_max_abs_diff']:.4g} ({f['bf16_max_abs_diff_over_max_abs_code']:.2%} of the "
        f"largest |code|), median relative L2 {f['bf16_median_relative_l2']:.2%}"
    )
    c = f["clusterings"]
    if "error" in c["fp32"]:
        print(f"fp32 clustering failed: {c['fp32']['error']}")
        return
    ref = c["fp32"]
    print(
        f"fp32: {ref['clusters']} clusters at eps {ref['eps']} (of {ref['eps_interval']}), noise "
        f"{ref['noise_share']:.1%}, ARI vs the planted kinds {ref['ari_vs_planted_kinds']}"
    )
    for name in ("bf16_radius_searched", "bf16_at_fp32_radius", "fp32_again"):
        r = c[name]
        if "error" in r:
            print(f"{name}: clustering failed: {r['error']}")
            continue
        print(
            f"{name}: {r['clusters']} clusters at eps {r['eps']}, noise {r['noise_share']:.1%}; "
            f"vs fp32: ARI {r['ari']:.4f}, labels changed {r['changed_share']:.1%} "
            f"({r['changed_images']} images)"
        )


def main() -> None:
    args = parse()
    tmp = Path(tempfile.mkdtemp(prefix="embed-precision-"))
    try:
        truth, embs = embeddings(tmp, args)
        figures: dict[str, Any] = {
            "device": "cpu", "images": len(truth), "kinds": args.kinds,
            "latent_dim": args.latent_dim, **shift(embs),
            "clusterings": clusterings(tmp, truth, embs, args),
        }  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
