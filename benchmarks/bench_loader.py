"""Training-loader throughput: the shard stream against per-file loading, local and S3.

One run, the same images, the same decode size and augmentation for every contender:

1. the shard stream from a local folder          (pneumo.training.data.train_batches)
2. the shard stream from S3                       (moto's ThreadedMotoServer on 127.0.0.1)
3. a per-file PNG dataset on local disk           (the usual Dataset: one image PNG and one
                                                   mask PNG per sample, both stored at the
                                                   training size, read with cv2, augmented
                                                   by albumentations, default collation)
4. the per-file PNGs as S3 objects                (one GET per image, one per mask)

The per-file PNGs are made once, before timing: each image decoded at full size and
area-resized to ``--size`` (the usual SIIM preprocessing), its mask likewise. The
augmentation distribution is the same on both sides (``pneumo.training.augment`` documents it;
the baseline runs its albumentations reference).

Loopback S3 has no network latency, so the S3 runs are repeated with ``--s3-latency-ms`` of
sleep before every request (a botocore ``before-send`` hook), like a remote bucket's
time to first byte. The dataset comes from the SIIM demo generator and the real ingest when
they are there, else from the 21 real SIIM JPEG frames in ``shared/data/siim``.

    python benchmarks/bench_loader.py [--n 400] [--size 512] [--workers 2] [--seconds 10]
        [--rounds 3] [--local-only]

Each round measures every contender once, back to back; the summary gives each rate's
and each ratio's range over the rounds (a ratio compares two rates of the same round).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import median
from typing import Any

import boto3
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.s3sim import s3_server, set_latency  # noqa: E402
from pneumo.shards import commits, layout, manifest, selections, stream  # noqa: E402
from pneumo.shards.store import open_store  # noqa: E402
from pneumo.shards.tario import ShardWriter  # noqa: E402
from pneumo.training import augment, data, decode  # noqa: E402

log = logging.getLogger("bench_loader")
SIIM = ROOT.parent / "shared" / "data" / "siim"
BUCKET = "pneumo-bench"


# ---------------------------------------------------------------- the dataset


def build_from_demo(out: Path, n: int, shard_size: int) -> str:
    from pneumo.ingest.batch import BatchConfig
    from pneumo.ingest.siim import SiimConfig, ingest_siim
    from pneumo.synthetic.archives import write_siim_demo

    demo = write_siim_demo(out / "dicom", n=n, seed=0, positive_fraction=0.3)
    batch = BatchConfig(out=str(out / "dataset"), workers=2, shard_max_samples=shard_size,
                        split_fractions=(1.0, 0.0, 0.0))  # fmt: skip
    ingest_siim(SiimConfig(dicom_root=str(demo.image_root), labels=demo.labels_csv, batch=batch))
    return "SIIM demo DICOMs (synthetic chests, JPEG Baseline 1024x1024) through ingest_siim"


def build_from_frames(out: Path, n: int, shard_size: int) -> str:
    import pydicom
    from pydicom.encaps import generate_frames

    frames = []
    for path in sorted(SIIM.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        frames.append(next(generate_frames(ds.PixelData, number_of_frames=1)))
    store = open_store(str(out / "dataset"))
    rows: list[dict[str, Any]] = []
    writers: dict[str, ShardWriter] = {}
    shard_count = {"pos": 0, "neg": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            positive = i % 10 < 3
            group = "pos" if positive else "neg"
            if group not in writers or writers[group].count >= shard_size:
                if group in writers:
                    _store_shard(store, writers[group])
                path = layout.shard_path("siim", "bench", "train", group, shard_count[group])
                shard_count[group] += 1
                writers[group] = ShardWriter(path, tmp)
            sample = {"__key__": f"s{i:05d}", "jpg": frames[i % len(frames)], "json": b"{}"}
            if positive:
                mask = np.zeros((1024, 1024), np.uint8)
                cv2.ellipse(mask, (300 + i % 400, 400), (90, 200), 10, 0, 360, 255, -1)
                sample["mask.png"] = cv2.imencode(".png", mask)[1].tobytes()
            writers[group].write(sample)
            rows.append({"key": sample["__key__"], "image_id": f"1.2.{i}", "dataset": "siim",
                         "batch": "bench", "shard": writers[group].path, "split": "train",
                         "has_ptx": positive, "image_format": "jpeg", "bit_depth": 8})  # fmt: skip
        for writer in writers.values():
            _store_shard(store, writer)
    commits.commit(store, manifest.to_table(rows), dataset="siim", batch="bench")
    return f"the {len(frames)} real SIIM JPEG frames, repeated, written with ShardWriter"


def _store_shard(store: Any, writer: ShardWriter) -> None:
    writer.close()
    store.put_file(writer.path, writer.tmp_path)
    Path(writer.tmp_path).unlink()


def write_pngs(dataset: str, out: Path, size: int) -> list[str]:
    """The training samples as ``images/KEY.png`` and ``masks/KEY.png`` at ``size`` (empty
    masks too)."""
    store = open_store(dataset)
    entries = stream.entries_from_table(data.select(dataset, selections.SIIM_TRAIN))
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    for shard in sorted({e.shard for e in entries}):
        wanted = {e.key: e for e in entries if e.shard == shard}
        for sample in stream.read_shard(store, shard, wanted):
            key = sample["__key__"]
            suffix = "jpg" if "jpg" in sample else "png"
            image = cv2.imdecode(np.frombuffer(sample[suffix], np.uint8), cv2.IMREAD_GRAYSCALE)
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            mask = decode.decode_mask(sample.get("mask.png"), size) * 255
            cv2.imwrite(str(out / "images" / f"{key}.png"), image)
            cv2.imwrite(str(out / "masks" / f"{key}.png"), mask)
    return [e.key for e in entries]


# ---------------------------------------------------------------- per-file loading


class PerFile(Dataset):
    """The usual segmentation Dataset: one image file and one mask file per sample."""

    def __init__(self, keys: list[str], read: Callable[[str], bytes], size: int) -> None:
        self.keys, self.read, self.size = keys, read, size
        self.compose = augment.reference_compose()

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.keys[i]
        image = cv2.imdecode(np.frombuffer(self.read(f"images/{key}.png"), np.uint8), 0)
        mask = cv2.imdecode(np.frombuffer(self.read(f"masks/{key}.png"), np.uint8), 0)
        if image.shape != (self.size, self.size):  # stored at the size: never, here
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(mask, (self.size, self.size), interpolation=cv2.INTER_AREA)
        mask = (mask >= 128).astype(np.uint8)
        image, mask = augment.reference_augment(self.compose, image, mask, seed=i)
        return (torch.from_numpy(image.astype(np.float32) / 255)[None],
                torch.from_numpy(mask.astype(np.float32))[None])  # fmt: skip


class LocalFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


class S3Objects:
    """One GET per object; the client is made in the worker that first reads."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.client = prefix, None

    def __call__(self, name: str) -> bytes:
        if self.client is None:
            self.client = boto3.session.Session().client("s3")
        return self.client.get_object(Bucket=BUCKET, Key=f"{self.prefix}/{name}")["Body"].read()


def per_file_rate(keys: list[str], read: Callable[[str], bytes], args: argparse.Namespace) -> float:
    loader = DataLoader(PerFile(keys, read, args.size), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, drop_last=True,
                        persistent_workers=args.workers > 0)  # fmt: skip

    def endless() -> Iterator[Any]:
        while True:
            yield from loader

    return timed(endless(), args.seconds)


def timed(batches: Iterator[Any], seconds: float) -> float:
    next(batches)  # worker start-up left out, as in data.bench_loader
    start, samples, elapsed = time.perf_counter(), 0, 0.0
    while elapsed < seconds:
        samples += len(next(batches)[0])
        elapsed = time.perf_counter() - start
    return samples / elapsed


# ---------------------------------------------------------------- S3


def upload(folder: Path, prefix: str) -> None:
    client = boto3.session.Session().client("s3")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")


# ---------------------------------------------------------------- main


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="samples in the dataset")
    p.add_argument("--size", type=int, default=512, help="decode size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="loader workers")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per contender")
    p.add_argument("--shard-size", type=int, default=50, help="samples per shard")
    p.add_argument("--s3-latency-ms", type=float, default=20.0, help="sleep before S3 requests")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--local-only", action="store_true", help="skip the S3 contenders")
    p.add_argument("--source", choices=["auto", "demo", "frames"], default="auto")
    return p.parse_args()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        if args.local_only:
            run(args, tmp)
        else:
            with s3_server(BUCKET):
                run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    use_demo = args.source == "demo" or (args.source == "auto" and _has_ingest())
    build = build_from_demo if use_demo else build_from_frames
    what = build(tmp, args.n, args.shard_size)
    local = str(tmp / "dataset")
    keys = write_pngs(local, tmp / "png", args.size)
    if not args.local_only:
        upload(tmp / "dataset", "dataset")
        upload(tmp / "png", "png")
    shards = sorted(p for p in (tmp / "dataset").rglob("*.tar"))
    print(f"dataset: {len(keys)} training samples from {what}; {len(shards)} shards, "
          f"{sum(p.stat().st_size for p in shards) / 2**20:.1f} MiB")  # fmt: skip
    print(f"decode size {args.size}, batch {args.batch_size}, {args.workers} workers, "
          f"{args.seconds:g} s per contender and round, flip + affine augmentation")  # fmt: skip

    def stream_rate(url: str) -> float:
        cfg = data.LoaderConfig(dataset=url, size=args.size, batch_size=args.batch_size,
                                workers=args.workers, augment=True)  # fmt: skip
        return data.bench_loader(cfg, args.seconds)

    latency, lat = args.s3_latency_ms / 1000, f" +{args.s3_latency_ms:g}ms"
    contenders = [
        ("stream local", 0.0, lambda: stream_rate(local)),
        ("per-file PNG local", 0.0, lambda: per_file_rate(keys, LocalFiles(tmp / "png"), args)),
    ]
    ratios = [("stream / per-file PNG (local)", "stream local", "per-file PNG local", 1.3)]
    if not args.local_only:
        contenders += [
            ("stream S3", 0.0, lambda: stream_rate(f"s3://{BUCKET}/dataset")),
            (f"stream S3{lat}", latency, lambda: stream_rate(f"s3://{BUCKET}/dataset")),
            ("per-object S3", 0.0, lambda: per_file_rate(keys, S3Objects("png"), args)),
            (f"per-object S3{lat}", latency, lambda: per_file_rate(keys, S3Objects("png"), args)),
        ]
        ratios += [
            ("S3 stream / local stream", "stream S3", "stream local", 0.9),
            (f"S3{lat} stream / local stream", f"stream S3{lat}", "stream local", 0.9),
            ("S3 stream / per-object S3", "stream S3", "per-object S3", 5.0),
            (f"S3{lat} stream / per-object S3{lat}", f"stream S3{lat}", f"per-object S3{lat}", 5.0),
        ]
    rounds: list[dict[str, float]] = []
    for round_ in range(args.rounds):  # interleaved rounds: others share the CPU
        rates = {}
        for name, delay, measure in contenders:
            set_latency(delay)
            rates[name] = measure()
            print(f"round {round_ + 1}  {name:<28} samples/s: {rates[name]:8.1f}", flush=True)
        rounds.append(rates)
    set_latency(0.0)
    print(f"summary over {args.rounds} rounds (min - max, median; ratios within each round):")
    for name, *_ in contenders:
        print(f"{name:<40} samples/s {_span([r[name] for r in rounds])}")
    for name, a, b, target in ratios:
        values = [r[a] / r[b] for r in rounds]
        verdict = "ok" if median(values) >= target else "BELOW TARGET"
        print(f"{name:<40} {_span(values)}  (target >= {target:g}: {verdict})")


def _span(values: list[float]) -> str:
    return f"{min(values):8.2f} - {max(values):8.2f}  (median {median(values):.2f})"


def _has_ingest() -> bool:
    try:
        from pneumo.ingest.siim import ingest_siim  # noqa: F401
        from pneumo.synthetic.archives import write_siim_demo  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
