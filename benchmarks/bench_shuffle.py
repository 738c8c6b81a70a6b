"""How mixed the training batches are, and what the mixing costs the loader.

An NIH-like set is written in patient order, as NIH's own tars and a hospital's export
come: ``--patients`` patients (500) with 1 to 30 images each (drawn from ``--seed``), in
shards of ``--shard-size`` samples. The training stream is read twice, with the same
batch size, workers and seed:

* **before**: what the stream did until issue 20, whole shards in a per-pass order through
  a 64-sample buffer (``piece`` larger than any shard, ``shuffle_buffer=64``);
* **now**: the defaults, pieces of ``slots.PIECE`` samples through
  ``stream.DEFAULT_SHUFFLE_BUFFER`` samples.

For each, the share of same-patient pairs among all pairs of samples in one batch, over
one epoch of every stream worker of rank 0, against that of a uniform random shuffle
(exact: sum n_p (n_p - 1) / N (N - 1) over patients p), and the training loader's
throughput at ``--size`` (read, decode, warp, augment, collate; ``data.bench_loader``), the
two loaders alternating for ``--rounds`` rounds. Goals (issue 20): share within 1.5x of
uniform; throughput within 10% of before.

    python benchmarks/bench_shuffle.py [--patients 500] [--size 512] [--workers 2]
        [--batch-size 32] [--seconds 8] [--rounds 3] [--image-px 512]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from collections import Counter
from pathlib import Path
from statistics import median

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pneumo.shards import commits, layout, manifest, stream  # noqa: E402
from pneumo.shards.store import open_store  # noqa: E402
from pneumo.shards.tario import ShardWriter  # noqa: E402
from pneumo.synthetic.chest import synth_chest  # noqa: E402
from pneumo.training import data  # noqa: E402

BEFORE = {"piece": 1 << 30, "shuffle_buffer": 64}  # whole shards, the old 64-sample buffer
NOW = {"piece": stream.slots.PIECE, "shuffle_buffer": stream.DEFAULT_SHUFFLE_BUFFER}


def patient_counts(patients: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 31, size=patients).tolist()


def write_dataset(root: Path, counts: list[int], shard_size: int, image_px: int) -> dict[str, str]:
    """The set in patient order; returns ``{key: patient}``. A few distinct chest images
    are encoded once and repeated (decode cost is what matters, not their variety)."""
    rng = np.random.default_rng(1)
    images = [cv2.imencode(".png", synth_chest(rng, image_px)[0])[1].tobytes() for _ in range(8)]
    store = open_store(str(root))
    rows, patient_of = [], {}
    keys = [(p, i) for p, n in enumerate(counts) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(keys), shard_size):
            path = layout.shard_path("nih", "bench", "train", "neg", start // shard_size)
            writer = ShardWriter(path, tmp)
            for p, i in keys[start : start + shard_size]:
                key, png = f"{p:05d}_{i:03d}", images[(p + i) % len(images)]
                offset, size = writer.write({"__key__": key, "png": png, "json": b"{}"})
                rows.append({
                    "key": key, "image_id": f"{key}.png", "dataset": "nih", "split": "train",
                    "has_ptx": False, "rows": image_px, "cols": image_px,
                    "patient_key": f"patient{p:05d}", "image_format": "png", "bit_depth": 8,
                    "findings": [], "shard": path, "batch": "bench", "offset": offset,
                    "size": size, "content_sha256": hashlib.sha256(png).hexdigest(),
                })  # fmt: skip
                patient_of[key] = f"patient{p:05d}"
            store.move_file(path, writer.close().tmp_path)
    commits.commit(store, manifest.to_table(rows), dataset="nih", batch="bench")
    return patient_of


def same_patient_share(batches: list[list[str]], patient_of: dict[str, str]) -> float:
    same = pairs = 0
    for keys in batches:
        counts = Counter(patient_of[k] for k in keys)
        same += sum(n * (n - 1) // 2 for n in counts.values())
        pairs += len(keys) * (len(keys) - 1) // 2
    return same / pairs


def uniform_share(counts: list[int]) -> float:
    n = sum(counts)
    return sum(c * (c - 1) for c in counts) / (n * (n - 1))


def stream_batches(url: str, settings: dict[str, int], args: argparse.Namespace) -> list[list[str]]:
    """Every batch of one epoch of rank 0 (its ``--workers`` stream workers), as keys."""
    store = open_store(url, create=False)
    entries = stream.entries_from_table(data.select(url, "dataset == 'nih'"))
    steps = len(entries) // args.batch_size
    spec = stream.TrainSpec(seed=args.seed, epoch=0, workers=args.workers,
                            batch_size=args.batch_size, steps_per_epoch=steps,
                            total_steps=steps, **settings)  # fmt: skip
    pools = stream.class_pools(entries, None)
    return [[s["__key__"] for s in batch] for _, batch in stream.rank_stream(store, pools, spec)]


def loader_rate(url: str, settings: dict[str, int], args: argparse.Namespace) -> float:
    cfg = data.LoaderConfig(dataset=url, where="dataset == 'nih'", size=args.size,
                            batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                            **settings)  # fmt: skip
    return data.bench_loader(cfg, args.seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--patients", type=int, default=500)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--image-px", type=int, default=512, help="side of the stored PNGs")
    p.add_argument("--size", type=int, default=512, help="training size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0, help="per loader measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix-only", action="store_true", help="skip the loader throughput")
    args = p.parse_args(argv)

    counts = patient_counts(args.patients, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "dataset")
        patient_of = write_dataset(Path(url), counts, args.shard_size, args.image_px)
        print(f"{sum(counts)} images of {len(counts)} patients in patient order, shards of "
              f"{args.shard_size}; batch {args.batch_size}, {args.workers} workers")  # fmt: skip
        uniform = uniform_share(counts)
        print(f"same-patient pairs in a batch, uniform shuffle: {uniform:.4f}")
        shares = {}
        for name, settings in (("before", BEFORE), ("now", NOW)):
            shares[name] = same_patient_share(stream_batches(url, settings, args), patient_of)
            print(f"  {name:6s} piece {min(settings['piece'], args.shard_size):3d}, buffer "
                  f"{settings['shuffle_buffer']:3d}: {shares[name]:.4f} = "
                  f"{shares[name] / uniform:.2f}x uniform")  # fmt: skip
        ok = shares["now"] / uniform <= 1.5
        if not args.mix_only:
            rates: dict[str, list[float]] = {"before": [], "now": []}
            for _ in range(args.rounds):
                for name, settings in (("before", BEFORE), ("now", NOW)):
                    rates[name].append(loader_rate(url, settings, args))
            ratios = [n / b for n, b in zip(rates["now"], rates["before"], strict=True)]
            print(f"loader at {args.size} px, {args.workers} workers, {args.rounds} rounds of "
                  f"{args.seconds:g} s: before {median(rates['before']):.0f}/s, now "
                  f"{median(rates['now']):.0f}/s; now / before {median(ratios):.2f} "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
            ok = ok and median(ratios) >= 0.9
    print("goals met" if ok else "goals NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
