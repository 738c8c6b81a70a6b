"""One command that measures pneumo's training speed on a GPU machine, in under 8 minutes.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget-s 420] [--smoke]

On synthetic shards it writes itself (1024 px JPEG frames and 1-bit mask PNGs, as ingest
stores them), it measures, each phase under its own time cap:

1. U-Net / ResNet-34 segmentation training (bf16 autocast, channels-last, Adam, the
   focal + Dice loss) on a batch already on the GPU: images/s at batch 8, then at powers
   of two up to the largest that fits (an out-of-memory error ends the search);
2. the same model fed by the real stream (``pneumo.training.data.train_batches``, loader
   workers = the machine's cores, augmentation on) at batch 8 and at the largest batch;
3. the GPU's busy share during every training phase (``nvidia-smi`` sampled every
   0.2 s in a background thread, or pynvml through ``torch.cuda.utilization``);
4. a classifier (torchvision ResNet-34, 1 input channel) and a small convolutional
   autoencoder, training images/s; and embedding (inference) images/s of the ResNet-34
   trunk. These three are stand-ins built here from torchvision and plain torch: the
   project's classify/autoencode/embed tasks are being written elsewhere (marked so in
   the output).

Results go to a JSON file, rewritten after every phase, so a run cut short still leaves
what it measured. ``--smoke`` runs everything at 64 px for 2 steps on whatever device
there is (the CPU test of this script). Without CUDA it refuses to run unless ``--smoke``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torchvision
from torch import nn

from pneumo.ingest.siim import encode_mask
from pneumo.shards import commits, layout, manifest
from pneumo.shards.store import open_store
from pneumo.shards.tario import ShardWriter
from pneumo.synthetic.chest import textured_frame
from pneumo.training.data import LoaderConfig, train_batches
from pneumo.training.losses import FocalDiceLoss
from pneumo.training.model import build_unet
from pneumo.training.runs import images_to, masks_to

STAND_IN = "stand-in built in gpu_check.py (torchvision/plain torch), not the project's task"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON results file")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting phases after")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seconds", type=float, default=12.0, help="timed seconds per measurement")
    p.add_argument("--max-batch", type=int, default=256, help="largest batch tried")
    p.add_argument("--max-stream-batch", type=int, default=128,
                   help="largest batch fed by the stream (its prefetched batches live in "
                        "shared memory: workers x 2 x batch x 2 MiB at 512 px)")  # fmt: skip
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers")
    p.add_argument("--samples", type=int, default=1024, help="synthetic samples in the shards")
    p.add_argument("--smoke", action="store_true", help="64 px, 2 steps, any device")
    args = p.parse_args()
    if args.smoke:
        args.size, args.seconds, args.max_batch, args.samples = 64, 0.0, 2, 16
        args.workers = min(args.workers, 2)
    return args


# ---------------------------------------------------------------- synthetic shards


def write_dataset(root: Path, n: int, seed: int = 0) -> str:
    """``n`` training samples (30% positive) in shards of 32, with a manifest; 1024 px."""
    rng = np.random.default_rng(seed)
    frames = [_chest_jpeg(rng) for _ in range(16)]  # decoding cost does not depend on reuse
    store = open_store(str(root))
    rows: list[dict[str, Any]] = []
    writer: ShardWriter | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            if writer is None or writer.count == 32:
                _put(store, writer)
                path = layout.shard_path("siim", "gpucheck", "train", "mix", i // 32)
                writer = ShardWriter(path, tmp)
            positive = i % 10 < 3
            sample = {"__key__": f"g{i:06d}", "jpg": frames[i % len(frames)], "json": b"{}"}
            if positive:
                mask = np.zeros((1024, 1024), np.uint8)
                centre = (200 + int(rng.integers(600)), 200 + int(rng.integers(600)))
                cv2.ellipse(mask, centre, (60, 150), 15, 0, 360, 1, -1)
                sample["mask.png"] = encode_mask(mask)
            writer.write(sample)
            rows.append({"key": sample["__key__"], "image_id": f"g{i}", "dataset": "siim",
                         "batch": "gpucheck", "shard": writer.path, "split": "train",
                         "has_ptx": positive, "image_format": "jpeg", "bit_depth": 8,
                         "rows": 1024, "cols": 1024})  # fmt: skip
        _put(store, writer)
    commits.commit(store, manifest.to_table(rows), dataset="siim", batch="gpucheck")
    return str(root)


def _chest_jpeg(rng: np.random.Generator) -> bytes:
    """A 1024 px textured frame as a quality-92 JPEG: costs a decoder what a chest does."""
    return cv2.imencode(".jpg", textured_frame(rng), [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()


def _put(store: Any, writer: ShardWriter | None) -> None:
    if writer is not None:
        writer.close()
        store.put_file(writer.path, writer.tmp_path)
        Path(writer.tmp_path).unlink()


# ---------------------------------------------------------------- GPU busy share


class BusySampler:
    """Samples the GPU's utilisation (percent of time a kernel ran) in a background thread."""

    def __init__(self, device: torch.device, period: float = 0.2) -> None:
        self.device, self.period = device, period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.source = _busy_source(device)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            value = self.source() if self.source else None
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> BusySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def _busy_source(device: torch.device) -> Callable[[], float | None] | None:
    if device.type != "cuda":
        return None
    try:
        torch.cuda.utilization(device)  # needs pynvml
        return lambda: float(torch.cuda.utilization(device))
    except Exception:  # no pynvml: ask nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    index = str(device.index or 0)
    cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i"]

    def query() -> float | None:
        try:
            out = subprocess.run([*cmd, index], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    return query


# ---------------------------------------------------------------- timing


def timed(step: Callable[[], Any], seconds: float, warmup: int, device: torch.device) -> dict:
    """images/s of ``step`` (returns images done) after ``warmup`` steps; at least 2 timed."""
    for _ in range(warmup):
        step()
    _sync(device)
    with BusySampler(device) as busy:
        start, images, steps = time.perf_counter(), 0, 0
        while steps < 2 or time.perf_counter() - start < seconds:
            images += step()
            steps += 1
        _sync(device)
        elapsed = time.perf_counter() - start
    return {"images_per_s": round(images / elapsed, 1), "steps": steps,
            "seconds": round(elapsed, 2), "gpu_busy_pct": busy.mean}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def _autocast(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def _on(device: torch.device, x: torch.Tensor) -> torch.Tensor:
    if device.type == "cuda" and x.ndim == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device)


# ---------------------------------------------------------------- the models


def _model(kind: str, device: torch.device) -> nn.Module:
    if kind == "unet":
        model = build_unet(1)
    elif kind == "classifier":
        model = torchvision.models.resnet34(weights=None, num_classes=1)
        model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    elif kind == "autoencoder":
        model = _autoencoder()
    else:
        raise ValueError(kind)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return model.to(device, memory_format=fmt)


def _autoencoder() -> nn.Module:
    """Five stride-2 convolutions down (to 1/32 of the side), five transposed ones up."""
    widths = [1, 32, 64, 128, 256, 256]
    down, up = [], []
    for a, b in zip(widths, widths[1:], strict=False):
        down += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU(True)]
    for a, b in zip(widths[::-1], widths[-2::-1], strict=False):
        last = b == 1
        up += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1)]
        up += [] if last else [nn.BatchNorm2d(b), nn.ReLU(True)]
    return nn.Sequential(*down, *up)


def train_step(kind: str, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device):
    """A training step closure for a model kind, on batches given as (images, targets)."""
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if kind == "unet":
        loss_fn = FocalDiceLoss()
    elif kind == "classifier":
        loss_fn = nn.BCEWithLogitsLoss()
    else:
        loss_fn = lambda out, target: nn.functional.mse_loss(out.float(), target)  # noqa: E731

    def step(images: torch.Tensor, targets: torch.Tensor) -> int:
        with _autocast(device):
            out = model(images)
        loss = loss_fn(out.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return images.shape[0]

    return step


def _targets(kind: str, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if kind == "unet":
        return masks
    if kind == "classifier":
        return masks.flatten(1).amax(1, keepdim=True)
    return images.float().contiguous()


def synthetic_rate(kind: str, batch: int, args: argparse.Namespace, device: torch.device):
    """Training images/s of ``kind`` at ``batch`` on a fixed batch already on the device."""
    model = _model(kind, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = _on(device, torch.rand(batch, 1, args.size, args.size))
    masks = (torch.rand(batch, 1, args.size, args.size, device=device) > 0.9).float()
    targets = _targets(kind, images, masks)
    step = train_step(kind, model, opt, device)
    return timed(lambda: step(images, targets), args.seconds, _warmup(args), device)


def embed_rate(batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Inference images/s of the ResNet-34 trunk (global-pooled 512-d features)."""
    model = _model("classifier", device)
    model.fc = nn.Identity()
    model.eval()
    images = _on(device, torch.rand(batch, 1, args.size, args.size))

    @torch.no_grad()
    def step() -> int:
        with _autocast(device):
            model(images)
        return batch

    return timed(step, args.seconds, _warmup(args), device)


def stream_rate(dataset: str, batch: int, args: argparse.Namespace, device: torch.device):
    """U-Net training images/s fed by the real stream (decode, augment, collate, copy)."""
    model = _model("unet", device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    step = train_step("unet", model, opt, device)
    cfg = LoaderConfig(dataset=dataset, size=args.size, batch_size=batch, workers=args.workers)
    huge = 1 << 40
    batches = train_batches(cfg, rank=0, world_size=1, epoch=0, steps_per_epoch=huge,
                            total_steps=huge)  # fmt: skip

    def one() -> int:
        b = next(batches)
        return step(images_to(device, b["image"]), masks_to(device, b["mask"]))

    try:  # the warm-up also starts the loader workers and fills their shuffle buffers
        return timed(one, args.seconds, _warmup(args) + 2, device)
    finally:
        batches.close()  # type: ignore[attr-defined]


def _warmup(args: argparse.Namespace) -> int:
    return 1 if args.smoke else 5


# ---------------------------------------------------------------- the run


class Run:
    """The results, a deadline, and each phase guarded: an error is recorded, not raised."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.deadline = time.monotonic() + args.budget_s
        self.results: dict[str, Any] = {"settings": _settings(args, device)}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, name: str, measure: Callable[[], Any], note: str | None = None) -> Any:
        if self.left() <= 0:
            self.results[name] = {"skipped": "time budget spent"}
        else:
            try:
                self.results[name] = measure()
            except torch.cuda.OutOfMemoryError:
                self.results[name] = {"error": "out of GPU memory"}
            except Exception as e:  # record and go on: one broken phase keeps the others
                self.results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            _free(self.device)  # out of the except block: its traceback held the tensors
        if note and isinstance(self.results[name], dict):
            self.results[name]["note"] = note
        self.save()
        print(f"{name}: {json.dumps(self.results[name])}", flush=True)
        return self.results[name]

    def save(self) -> None:
        Path(self.args.out).write_text(json.dumps(self.results, indent=2) + "\n")


def batch_search(run: Run, kind: str, start: int = 8) -> dict:
    """Powers of two from ``start`` while they fit, the run's time allows, and <= max."""
    rates: dict[str, Any] = {}
    largest = None
    batch = min(start, run.args.max_batch)
    cap = time.monotonic() + max(0.0, min(run.left() * 0.4, 150.0))
    while batch <= run.args.max_batch:
        try:
            rates[str(batch)] = synthetic_rate(kind, batch, run.args, run.device)
        except torch.cuda.OutOfMemoryError:
            rates[str(batch)] = "out of memory"
        _free(run.device)  # out of the except block: its traceback held the tensors
        if rates[str(batch)] == "out of memory":
            break
        largest = batch
        if time.monotonic() > cap:
            rates["stopped"] = "time cap of the search"
            break
        batch *= 2
    return {"by_batch": rates, "largest_batch": largest}


def _settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "size": args.size, "seconds": args.seconds, "workers": args.workers,
        "smoke": args.smoke, "torch": torch.__version__, "device": str(device),
        "cpu_count": os.cpu_count(), "precision": "bf16 autocast" if device.type == "cuda"
        else "float32 (CPU)", "memory_format": "channels_last" if device.type == "cuda"
        else "contiguous",
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def main() -> None:
    args = parse()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    if device.type == "cpu":  # the smoke run: OpenMP threads spin 10x slower on busy cores
        torch.set_num_threads(1)
    run = Run(args, device)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        dataset = run.phase("dataset", lambda: {"path": write_dataset(tmp / "ds", args.samples)})
        seg = run.phase("segment_synthetic", lambda: batch_search(run, "unet"))
        small = min(8, args.max_batch)
        largest = seg.get("largest_batch") or small
        for batch in sorted({small, min(largest, args.max_stream_batch)}):
            run.phase(
                f"segment_stream_batch{batch}",
                lambda b=batch: stream_rate(dataset["path"], b, args, device),
            )
        cls_batch = min(64, args.max_batch)
        run.phase("classifier", lambda: synthetic_rate("classifier", cls_batch, args, device)
                  | {"batch": cls_batch}, STAND_IN)  # fmt: skip
        run.phase("autoencoder", lambda: synthetic_rate("autoencoder", cls_batch, args, device)
                  | {"batch": cls_batch}, STAND_IN)  # fmt: skip
        emb_batch = min(256, args.max_batch)
        run.phase("embedding", lambda: embed_rate(emb_batch, args, device) | {"batch": emb_batch},
                  STAND_IN)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run.save()
    print_table(run.results)
    print(f"results in {args.out}")


def print_table(results: dict[str, Any]) -> None:
    """images/s and GPU busy share of every measurement, one line each."""
    rows = []
    for name, value in results.items():
        if name == "segment_synthetic" and isinstance(value, dict) and "by_batch" in value:
            rows += [(f"segment synthetic batch {b}", v) for b, v in value["by_batch"].items()]
        elif name not in ("settings", "dataset"):
            rows.append((name.replace("_", " "), value))
    print(f"{'measurement':<36} {'images/s':>10} {'GPU busy %':>10}")
    for label, value in rows:
        if isinstance(value, dict) and "images_per_s" in value:
            busy = value.get("gpu_busy_pct")
            print(
                f"{label:<36} {value['images_per_s']:>10} {busy if busy is not None else '-':>10}"
            )
        else:
            print(f"{label:<36} {json.dumps(value)[:60]}")


if __name__ == "__main__":
    main()
