"""SIIM ingest throughput against the usual per-file loop, in one run on the same files.

The baseline is what most SIIM pipelines do before training: for every DICOM, decode it
with pydicom, resize to 512, write a PNG, and the same for its mask. pneumo keeps the JPEG
frame as it is (no decode) and writes tar shards.

    python benchmarks/bench_ingest.py [--n 300] [--workers 1 2]

Prints DICOMs/s for each and the ratios (target: >= 10x on one worker, near-linear with
--workers). Timings are noisy on shared machines: compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
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


def pneumo_ingest(root: Path, labels_csv: Path, out: Path, workers: int) -> float:
    start = time.perf_counter()
    summary = ingest_siim(SiimConfig(dicom_root=str(root), labels=labels_csv,
                                     batch=BatchConfig(out=str(out), workers=workers)))
    elapsed = time.perf_counter() - start
    if not summary.committed or summary.quarantined:
        raise SystemExit(f"ingest did not run cleanly: {summary}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="DICOMs (1024x1024 JPEG Baseline)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
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
            t = pneumo_ingest(Path(demo.image_root), demo.labels_csv, tmp_path / f"ds{w}", w)
            results[w] = len(files) / t
            print(f"pneumo ingest --workers {w}:         {results[w]:8.1f} DICOMs/s")
        first = args.workers[0]
        ratio = results[first] * base / len(files)
        print(f"ratio pneumo ({first} worker) / per-file loop: {ratio:.1f}x")
        for w in args.workers[1:]:
            print(f"scaling --workers {w} / --workers {first}: {results[w] / results[first]:.2f}x")


if __name__ == "__main__":
    main()
