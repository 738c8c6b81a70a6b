"""The stream's integrity check against the decode of the same samples, in one run.

Every sample the training and evaluation stream reads is checked before it is decoded
(:func:`pneumo.shards.verify.check_sample`: its members fill its span, its image member
hashes to the manifest's ``content_sha256``). This measures that check against the least
the loader then does with the same bytes: :func:`pneumo.training.decode.decode_image` at the
training size (a JPEG reduced in the DCT, then area-resized; no augmentation, no mask), and
for reference the image decoded at full size. Target: the check well under the decode.

Samples: the JPEG frames of the real SIIM DICOMs (1024x1024, stored by ingest as they are)
and the real NIH PNGs (1024x1024, 8 bits), from ``../shared/data`` (else the SIIM DICOMs of
``tests/data``).

    python benchmarks/bench_hash.py [--size 512] [--repeat 5] [--rounds 5]

Each round times every contender over all samples ``--repeat`` times, back to back, on one
thread (OpenCV's included: the loader's workers each decode on one core); the summary gives
each figure's median and range over the rounds, and the ratio of each round's check to
that round's decode.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import cv2
import numpy as np
import pydicom
from pydicom.encaps import generate_frames

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pneumo.shards.members import image_suffix  # noqa: E402
from pneumo.shards.slots import Entry  # noqa: E402
from pneumo.shards.verify import check_sample, stored_size  # noqa: E402
from pneumo.training.decode import decode_image  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
COMMITTED = ROOT / "tests" / "data"


def load_samples() -> tuple[list[tuple[dict, Entry]], str]:
    """(sample, its manifest entry) for every real image at hand, and where they came from."""
    siim = SHARED / "siim" if (SHARED / "siim").is_dir() else COMMITTED / "siim"
    images: list[tuple[str, bytes]] = []
    for path in sorted(siim.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if "PixelData" in ds and ds.file_meta.TransferSyntaxUID.is_compressed:
            images.append(("jpg", next(generate_frames(ds.PixelData, number_of_frames=1))))
    n_jpeg = len(images)
    images += [("png", p.read_bytes()) for p in sorted((SHARED / "nih" / "images").glob("*.png"))]
    samples = []
    for i, (suffix, data) in enumerate(images):
        sample = {"__key__": f"s{i:03d}", suffix: data, "json": b"{}"}
        size = stored_size(len(data)) + stored_size(2)
        digest = hashlib.sha256(data).hexdigest()
        samples.append((sample, Entry(f"s{i:03d}", "x.tar", "x", False, 0, size, digest)))
    return samples, f"{n_jpeg} SIIM JPEG frames from {siim}, {len(images) - n_jpeg} NIH PNGs"


def _image(sample: dict) -> tuple[str, bytes]:
    suffix = image_suffix(sample)
    assert suffix is not None
    return suffix, sample[suffix]


def contenders(size: int) -> dict[str, Callable[[dict, Entry], object]]:
    return {
        "check (sha256)": lambda s, e: check_sample("x.tar", e, s),
        f"decode at {size}": lambda s, e: decode_image(_image(s)[1], _image(s)[0], size),
        "decode full": lambda s, e: cv2.imdecode(
            np.frombuffer(_image(s)[1], np.uint8), cv2.IMREAD_UNCHANGED
        ),
    }


def timed(fn: Callable[[dict, Entry], object], samples: list, repeat: int) -> float:
    """Seconds per sample: ``repeat`` passes over ``samples``."""
    start = time.perf_counter()
    for _ in range(repeat):
        for sample, entry in samples:
            fn(sample, entry)
    return (time.perf_counter() - start) / (repeat * len(samples))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="training size to decode to")
    p.add_argument("--repeat", type=int, default=5, help="passes over the samples per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = p.parse_args()
    cv2.setNumThreads(1)
    samples, what = load_samples()
    mb = sum(len(_image(s)[1]) for s, _ in samples) / len(samples) / 1e6
    print(f"samples: {what}; {mb:.3f} MB of image bytes each on average")
    runs = contenders(args.size)
    for fn in runs.values():  # warm-up: imports, caches
        timed(fn, samples[:2], 1)
    results: dict[str, list[float]] = {name: [] for name in runs}
    ratios: dict[str, list[float]] = {name: [] for name in list(runs)[1:]}
    for r in range(args.rounds):
        times = {name: timed(fn, samples, args.repeat) for name, fn in runs.items()}
        for name, t in times.items():
            results[name].append(t)
        check = times["check (sha256)"]
        for name in ratios:
            ratios[name].append(check / times[name])
        print(f"round {r + 1}: " + ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in times.items()))
    print("\nper sample (median, range over rounds):")
    for name, ts in results.items():
        print(f"  {name:16s} {median(ts) * 1e3:7.3f} ms  ({min(ts) * 1e3:.3f}-{max(ts) * 1e3:.3f})")
    for name, rs in ratios.items():
        print(
            f"check / {name}: {median(rs):.1%} (range {min(rs):.1%}-{max(rs):.1%}; "
            "each round's check over that round's decode)"
        )


if __name__ == "__main__":
    main()
