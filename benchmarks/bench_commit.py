"""What a batch's commit and a manifest read cost as a dataset grows, beside an ingest.

    python benchmarks/bench_commit.py [--batches 100 1000] [--rows 50] [--ingest-n 256] [--s3]

Commits ``max(--batches)`` batches of ``--rows`` synthetic rows each through
``pneumo.shards.commits.commit`` (the Delta MERGE every ingest ends with). At each count in
``--batches`` it reports the median time of the last 10 commits and of a full
``manifest.read``; the baseline is a one-worker ``ingest_siim`` of ``--ingest-n``
1024-pixel DICOMs (SIIM's size) in the same run, so the figures read as "a commit is X% of
an ingest of that many images". ``--s3``
runs the same on a loopback S3 server (moto) instead of a local folder; moto answers in
microseconds, so S3 figures are request counts at work, not network time.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import pyarrow as pa

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import commits, manifest
from pneumo.shards.store import open_store
from pneumo.synthetic.archives import write_siim_demo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.s3sim import s3_server  # noqa: E402


def batch_rows(batch: int, rows: int) -> pa.Table:
    out = []
    for i in range(rows):
        image_id = f"img{batch:05d}_{i:04d}"
        out.append(
            {
                "key": image_id,
                "image_id": image_id,
                "dataset": "siim",
                "batch": f"b{batch:05d}",
                "shard": f"shards/siim/b{batch:05d}/s.tar",
                "offset": i * 1024,
                "size": 1024,
                "split": ("train", "val", "test")[i % 3],
                "has_ptx": bool(i % 2),
                "content_sha256": hashlib.sha256(image_id.encode()).hexdigest(),
                "labels_version": 1,
            }
        )
    return manifest.to_table(out)


def ingest_seconds(n: int, work: Path) -> float:
    demo = work / "demo"
    write_siim_demo(demo, n=n, seed=1, size=1024)
    cfg = SiimConfig(
        dicom_root=str(demo / "dicom-images-train"),
        labels=demo / "train-rle.csv",
        batch=BatchConfig(out=str(work / "ingest-ds")),
    )
    start = time.perf_counter()
    ingest_siim(cfg)
    return time.perf_counter() - start


def measure(out: str, counts: list[int], rows: int) -> list[dict[str, float]]:
    store = open_store(out)
    results = []
    times: list[float] = []
    for b in range(max(counts)):
        start = time.perf_counter()
        commits.commit(store, batch_rows(b, rows), dataset="siim", batch=f"b{b:05d}")
        times.append(time.perf_counter() - start)
        if b + 1 in counts:
            start = time.perf_counter()
            table = manifest.read(store)
            read_s = time.perf_counter() - start
            assert table.num_rows == (b + 1) * rows
            results.append({"batches": b + 1, "commit_s": median(times[-10:]), "read_s": read_s})
            print(
                f"  {b + 1:5d} batches: commit {median(times[-10:]) * 1000:7.1f} ms "
                f"(median of last 10), read {read_s * 1000:7.1f} ms ({table.num_rows} rows)",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--ingest-n", type=int, default=256)
    parser.add_argument("--s3", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ingest_s = ingest_seconds(args.ingest_n, work)
        print(f"baseline: ingest of {args.ingest_n} DICOMs on 1 worker: {ingest_s:.2f} s")
        if args.s3:
            with s3_server("bench-commit") as _:
                results = measure("s3://bench-commit/ds", args.batches, args.rows)
        else:
            results = measure(str(work / "ds"), args.batches, args.rows)
        for r in results:
            print(
                f"{r['batches']:5d} batches: commit = {100 * r['commit_s'] / ingest_s:.1f}% "
                f"of the ingest, read = {100 * r['read_s'] / ingest_s:.1f}%"
            )


if __name__ == "__main__":
    main()
