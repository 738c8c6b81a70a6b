"""SIIM ingest throughput against the usual per-file loop, in one run on the same files.

The baseline is what most SIIM pipelines do before training: for every DICOM, decode it
with pydicom, resize to 512, write a PNG, and the same for its mask. pneumo keeps the JPEG
frame as it is (no decode) and writes tar shards.

    python benchmarks/bench_ingest.py [--n 300] [--workers 1 2] [--s3-latency-ms 20]

Prints DICOMs/s for each and the ratios (target: >= 10x on one worker, near-linear with
--workers), then the same ingest into S3 (a loopback server whose every request first
sleeps --s3-latency-ms, like a remote bucket) against the local folder. Timings are noisy
on shared machines: compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom

from ingest.batch import BatchConfig
from ingest.demo import write_siim_demo
from ingest.labels import read_siim_labels
from ingest.rle import combine_masks
from ingest.siim import SiimConfig, ingest_siim

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.s3sim import s3_server, set_latency  # noqa: E402


def per_file_baseline(files: list[Path], labels_csv: Path, out: Path) -> float:
    """The usual loop: pydicom decode -> resize 512 -> PNG, image and mask. Returns seconds."""
    out.mkdir(parents=True)
    start = time.perf_counter()
    labels, _ = read_siim_labels(labels_csv)
    for path in files:
        ds = pydicom.dcmread(path)
        image = ds.pixel_array
        uid = str(ds.SOPInstanceUID)
        small = cv2.resize(image, (512, 512), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out / f"{uid}.png"), small)
        label = labels.get(uid)
        mask = combine_masks(list(label.rles) if label else [], ds.Rows, ds.Columns)
        mask = cv2.resize(mask * np.uint8(255), (512, 512), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(out / f"{uid}_mask.png"), mask)
    return time.perf_counter() - start


def pneumo_ingest(root: Path, labels_csv: Path, out: str, workers: int) -> float:
    start = time.perf_counter()
    # Shards of 200 samples: a handful of uploads even for a small benchmark batch.
    summary = ingest_siim(
        SiimConfig(
            dicom_root=str(root),
            labels=labels_csv,
            batch=BatchConfig(out=out, workers=workers, shard_max_samples=200),
        )
    )
    elapsed = time.perf_counter() - start
    if not summary.committed or summary.quarantined:
        raise SystemExit(f"ingest did not run cleanly: {summary}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="DICOMs (1024x1024 JPEG Baseline)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--s3-latency-ms",
        type=float,
        default=20.0,
        help="simulated time to first byte of every S3 request",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # SIIM-like: 22% positive, 1024x1024 JPEG Baseline DICOMs, stage-1 CSV.
        demo = write_siim_demo(tmp_path / "src", n=args.n, seed=7, positive_fraction=0.22)
        files = sorted(Path(demo.image_root).rglob("*.dcm"))
        for f in files:  # warm the page cache so both sides read from memory
            f.read_bytes()
        base = per_file_baseline(files, demo.labels_csv, tmp_path / "baseline")
        print(f"per-file loop (decode+resize+PNG): {len(files) / base:8.1f} DICOMs/s")
        results = {}
        for w in args.workers:
            t = pneumo_ingest(Path(demo.image_root), demo.labels_csv, str(tmp_path / f"ds{w}"), w)
            results[w] = len(files) / t
            print(f"pneumo ingest --workers {w}:         {results[w]:8.1f} DICOMs/s")
        first = args.workers[0]
        ratio = results[first] * base / len(files)
        print(f"ratio pneumo ({first} worker) / per-file loop: {ratio:.1f}x")
        for w in args.workers[1:]:
            print(f"scaling --workers {w} / --workers {first}: {results[w] / results[first]:.2f}x")
        # The loopback server runs on the same cores (it hashes and stores every byte), so
        # compare S3 with and without latency: uploads overlap the work, latency is hidden.
        with s3_server("pneumo-bench") as bucket:
            for latency in (0.0, args.s3_latency_ms):
                set_latency(latency / 1000)
                for w in args.workers:
                    out = f"{bucket}/ds{w}-{latency:g}ms"
                    rate = len(files) / pneumo_ingest(
                        Path(demo.image_root), demo.labels_csv, out, w
                    )
                    print(
                        f"pneumo ingest --workers {w} into S3 +{latency:g} ms: {rate:8.1f} "
                        f"DICOMs/s ({rate / results[w]:.2f}x the local folder)"
                    )


if __name__ == "__main__":
    main()
