"""One command that measures pneumo's own tasks on a GPU machine, in about 8 minutes.

    python benchmarks/gpu_check.py [--json gpu_check.json] [--budget-s 480]
    python benchmarks/gpu_check.py --cpu-smoke --json smoke.json     # CI: 64 px, 2 steps a task

On a synthetic SIIM-like dataset it writes itself (1024 px JPEG frames and 1-bit mask PNGs,
as ingest stores them; train and val splits), it runs the project's real entry points:
``train_segment``, ``train_classify``, ``train_autoencode`` (each one short epoch of
:mod:`pneumo.training.loop`: its stream, loader workers, step, validation, checkpoints) and
``embed`` (of the autoencoder just trained). For every task, at 512 px, in bf16 and fp16,
at batch 8 and at the largest batch that fits (doubling from 8 until
``torch.cuda.OutOfMemoryError``, or ``--max-batch``), it prints and writes to ``--json``:

* images/s over the steps after ``--warmup`` steps, timed between two of the loop's loss
  readings (``log_every = --warmup``: each reading waits for the device, so the step before
  it has finished; the other step reports do not wait and are not timed);
* the GPU's busy share over those same steps: pynvml (``torch.cuda.utilization``), else
  ``nvidia-smi``, else the share of polls that found the CUDA stream with work queued;
* peak GPU memory of the whole run (``torch.cuda.max_memory_allocated``);

and the segment task compiled (``torch.compile``) against eager at batch 8, bf16.

Precision and compilation reach the loop as ``RunConfig(precision=..., compile=...)`` and
embed as ``EmbedConfig(precision=...)``. The JSON is rewritten after every run,
so a run cut short still leaves what it measured; each run's line goes to stderr as it ends,
the table to stdout at the end.

``--cpu-smoke`` runs the same matrix at 64 px, batch 2, 2 steps a task, on the CPU: it checks
the plumbing, not the precisions (training autocasts on CUDA only; no compiled run: inductor's
C++ build takes minutes there). Without CUDA and without it, the script refuses to run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: bench_embed_precision imports from here
    sys.path.insert(0, str(ROOT))

from pneumo.ingest.siim import encode_mask  # noqa: E402
from pneumo.pseudolabels.embed import EmbedConfig, embed  # noqa: E402
from pneumo.shards import commits, layout, manifest, selections  # noqa: E402
from pneumo.shards.store import open_store  # noqa: E402
from pneumo.shards.tario import ShardWriter  # noqa: E402
from pneumo.synthetic.chest import textured_frame  # noqa: E402
from pneumo.training.autoencode import AutoencodeConfig, train_autoencode  # noqa: E402
from pneumo.training.classify import ClassifyConfig, train_classify  # noqa: E402
from pneumo.training.segment import SegmentConfig, train_segment  # noqa: E402

TASKS = ("segment", "classify", "autoencode", "embed")
TRAIN = {"segment": train_segment, "classify": train_classify, "autoencode": train_autoencode}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", default="gpu_check.json", help="results file")
    p.add_argument("--budget-s", type=float, default=480.0, help="start no run after this")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="the first batch size of each task")
    p.add_argument("--max-batch", type=int, default=256,
                   help="largest batch tried (a training batch's images wait in shared "
                        "memory: workers x 2 x batch x 256 KiB at 512 px)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps (batches) of a run; the loop's log_every")  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="timed steps of each training run")
    p.add_argument("--precisions", default="bf16,fp16")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers")
    p.add_argument("--samples", type=int, default=2048,
                   help="training samples written (embed reads them all)")  # fmt: skip
    p.add_argument("--no-compile", action="store_true", help="skip the compiled segment run")
    p.add_argument("--cpu-smoke", action="store_true", help="64 px, batch 2, 2 steps, CPU")
    args = p.parse_args(argv)
    args.precisions = [x for x in args.precisions.split(",") if x]
    args.tasks = [x for x in args.tasks.split(",") if x]
    unknown = set(args.tasks) - set(TASKS)
    if unknown:
        p.error(f"--tasks: unknown {sorted(unknown)}; choose from {TASKS}")
    args.frame_side = 1024
    if args.cpu_smoke:
        args.size, args.batch, args.max_batch, args.warmup, args.steps = 64, 2, 2, 1, 1
        args.workers, args.samples, args.frame_side, args.no_compile = 0, 16, 256, True
    return args


# ---------------------------------------------------------------- synthetic shards


def write_samples(root: Path, samples: Iterable[dict[str, Any]], *, dataset: str = "siim") -> str:
    """Shards of 32 samples per split and a committed manifest batch under ``root``.

    Each sample: ``key``, ``split``, ``has_ptx`` (None: unlabelled), ``image`` (bytes),
    ``format`` (``jpeg`` | ``png``), ``side``, and ``mask`` (PNG bytes) for a positive.
    No ``content_sha256``: the frames are reused, and a commit keeps one row per pixel hash.
    """
    store = open_store(str(root))
    rows: list[dict[str, Any]] = []
    writers: dict[str, ShardWriter] = {}
    shards: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in samples:
            split = s["split"]
            writer = writers.get(split)
            if writer is None or writer.count == 32:
                _put(store, writer)
                shards[split] = shards.get(split, -1) + 1
                path = layout.shard_path(dataset, "gpucheck", split, "mix", shards[split])
                writer = writers[split] = ShardWriter(path, tmp)
            member = {"__key__": s["key"], "json": b"{}"}
            member["jpg" if s["format"] == "jpeg" else "png"] = s["image"]
            if s.get("mask") is not None:
                member["mask.png"] = s["mask"]
            offset, size = writer.write(member)
            rows.append({"key": s["key"], "image_id": s["key"], "dataset": dataset,
                         "batch": "gpucheck", "shard": writer.path, "offset": offset,
                         "size": size, "split": split, "has_ptx": s["has_ptx"],
                         "image_format": s["format"], "bit_depth": 8, "rows": s["side"],
                         "cols": s["side"], "patient_key": s["key"]})  # fmt: skip
        for writer in writers.values():
            _put(store, writer)
    commits.commit(store, manifest.to_table(rows), dataset=dataset, batch="gpucheck")
    return str(root)


def _put(store: Any, writer: ShardWriter | None) -> None:
    if writer is not None:
        store.move_file(writer.path, writer.close().tmp_path)


def siim_like(n_train: int, n_val: int, side: int, seed: int = 0) -> Iterable[dict[str, Any]]:
    """Chest-sized JPEG frames (16 distinct, reused: decoding costs the same), 30% of train
    and half of val positive with an elliptic mask."""
    rng = np.random.default_rng(seed)
    frames = [_jpeg(textured_frame(rng, side)) for _ in range(16)]
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        positive = i % 10 < 3 if split == "train" else i % 2 == 0
        mask = None
        if positive:
            m = np.zeros((side, side), np.uint8)
            centre = tuple(int(c) for c in side // 5 + rng.integers(0, side * 3 // 5, 2))
            cv2.ellipse(m, centre, (side // 16, side // 7), 15, 0, 360, 1, -1)
            mask = encode_mask(m)
        yield {"key": f"g{i:06d}", "split": split, "has_ptx": positive, "image": frames[i % 16],
               "format": "jpeg", "side": side, "mask": mask}  # fmt: skip


def _jpeg(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()


# ---------------------------------------------------------------- GPU busy share


class BusySampler:
    """Samples the GPU's busy share (percent) in a background thread."""

    def __init__(self, device: torch.device, period: float = 0.1) -> None:
        self.device = device
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.kind, self.source = _busy_source(device)
        # Polling a stream needs many short polls; pynvml / nvidia-smi average for us.
        self.period = 0.002 if self.kind == "stream-poll" else period

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
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def _busy_source(device: torch.device) -> tuple[str | None, Callable[[], float | None] | None]:
    """The best source of the busy share there is, and its name."""
    if device.type != "cuda":
        return None, None
    try:
        torch.cuda.utilization(device)  # needs pynvml
        return "pynvml", lambda: float(torch.cuda.utilization(device))
    except Exception:  # no pynvml (ModuleNotFoundError) or no NVML: try the next
        pass
    if shutil.which("nvidia-smi") is not None:
        index = str(device.index or 0)
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]

        def query() -> float | None:
            try:
                out = subprocess.run([*cmd, "-i", index], capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip().splitlines()[0])
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return None

        return "nvidia-smi", query
    stream = torch.cuda.default_stream(device)  # the loop's steps run on it
    return "stream-poll", lambda: 0.0 if stream.query() else 100.0


# ---------------------------------------------------------------- one run, measured


class Meter:
    """The progress callback of one run: times the steps after the first ``warmup`` and
    samples the busy share over them, between reports that waited for the device.

    Training reports ``{"event": "step", "step", "total"}`` every step, with ``"loss"`` when
    it read the loss (every ``log_every`` steps and the last: those waited); embed reports
    ``{"done", "total"}`` images after every batch (each waited: its codes were copied).
    """

    def __init__(self, device: torch.device, warmup: int, batch: int) -> None:
        self.device, self.warmup, self.batch = device, warmup, batch
        self.reports = 0
        self.start: tuple[float, int, int] | None = None  # (time, images, reports)
        self.end: tuple[float, int, int] | None = None
        self.busy: BusySampler | None = None

    def __call__(self, report: dict[str, Any]) -> None:
        if "done" in report:
            images, synced, last = report["done"], True, report["done"] >= report["total"]
        elif report.get("event") == "step":
            images, synced = report["step"] * self.batch, "loss" in report
            last = report["step"] >= report["total"]
        else:
            return  # the loop's epoch reports
        self.reports += 1
        if not synced:
            return
        point = (time.perf_counter(), images, self.reports)
        if self.start is None:
            if self.reports >= self.warmup and not last:
                self.start = point
                self.busy = BusySampler(self.device).__enter__()
            return
        self.end = point
        if last and self.busy is not None:
            self.busy.__exit__()

    def figures(self) -> dict[str, Any]:
        if self.busy is not None:
            self.busy.__exit__()
        if self.start is None or self.end is None:
            return {"images_per_s": None, "timed_steps": 0, "note": "too few steps to time"}
        seconds = self.end[0] - self.start[0]
        return {
            "images_per_s": round((self.end[1] - self.start[1]) / seconds, 1),
            "timed_steps": self.end[2] - self.start[2],
            "seconds": round(seconds, 3),
            "gpu_busy_pct": self.busy.mean if self.busy else None,
            "gpu_busy_source": self.busy.kind if self.busy else None,
        }


class Unsupported(Exception):
    """A run that cannot be made (embed without an autoencoder run)."""


def task_config(task: str, args: argparse.Namespace, ctx: dict[str, Any], out: str,
                batch: int, precision: str, compiled: bool = False) -> Any:  # fmt: skip
    """The config of one short run of ``task``: one epoch of warm-up + timed steps."""
    if task == "embed":
        if "ae_run" not in ctx:
            raise Unsupported("no autoencoder run to embed with (the autoencode runs failed)")
        return EmbedConfig(run=ctx["ae_run"], dataset=ctx["dataset"], out=out, batch_size=batch,
                           workers=args.workers, precision=precision)  # fmt: skip
    common = {
        "dataset": ctx["dataset"], "out": out, "size": args.size, "batch_size": batch,
        "epochs": 1, "steps_per_epoch": args.warmup + args.steps, "workers": args.workers,
        "resume": "never", "precision": precision, "compile": compiled,
        "log_every": args.warmup,
    }  # fmt: skip
    if task == "segment":
        return SegmentConfig(**common, warmup_steps=1)
    if task == "classify":  # no PreciseBN: its extra forwards are not the step's cost
        return ClassifyConfig(**common, where=selections.SIIM_TRAIN,
                              val_where=selections.SIIM_VAL, precise_bn=0)  # fmt: skip
    return AutoencodeConfig(**common, kind="vae")


def measure(run: Run, task: str, batch: int, precision: str, compiled: bool = False) -> dict:
    """Run ``task`` once through its real entry point; its figures (raises on OOM)."""
    name = f"{task}-{precision}-b{batch}{'-compiled' if compiled else ''}"
    out = str(run.tmp / name)
    cfg = task_config(task, run.args, run.ctx, out, batch, precision, compiled)
    device = run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup = run.args.warmup
    if task == "embed":  # it embeds the dataset once: a third of its batches at most
        warmup = max(1, min(warmup, -(-run.ctx["rows"] // batch) // 3))
    meter = Meter(device, warmup, batch)
    try:
        if task == "embed":
            result = embed(cfg, progress=meter)
            summary = {"rows": result["rows"], "precision": result["precision"]}
        else:
            result = TRAIN[task](cfg, progress=meter)
            summary = {k: result[k] for k in ("task", "step", "total_steps")}
            if task == "autoencode" and "ae_run" not in run.ctx:
                run.ctx["ae_run"] = out  # the autoencoder the embed runs use
    finally:
        figures = meter.figures()  # also stops its sampler thread
        if out != run.ctx.get("ae_run"):
            shutil.rmtree(out, ignore_errors=True)  # its checkpoints: ~100 MB a run
    if device.type == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return {**figures, "entry_point": summary}


# ---------------------------------------------------------------- the run


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


class Run:
    """The results, a deadline, and each measurement guarded: an error is recorded, the
    other measurements go on."""

    def __init__(self, args: argparse.Namespace, device: torch.device, tmp: Path) -> None:
        self.args, self.device, self.tmp = args, device, tmp
        self.deadline = time.monotonic() + args.budget_s
        self.ctx: dict[str, Any] = {}
        self.results: dict[str, Any] = {"settings": _settings(args, device), "runs": [],
                                        "largest_batch": {}, "compile": {}}  # fmt: skip

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def one(self, task: str, batch: int, precision: str, compiled: bool = False) -> dict:
        """One measured run, recorded (``{"error": "out of memory"}`` when it did not fit)."""
        row: dict[str, Any] = {"task": task, "precision": precision, "batch": batch,
                               "compile": compiled}  # fmt: skip
        if self.left() <= 0:
            row["skipped"] = "time budget spent"
        else:
            try:
                row.update(measure(self, task, batch, precision, compiled))
            except Unsupported as e:
                row["skipped"] = str(e)
            except Exception as e:  # noqa: BLE001 - record and go on: one failure keeps the rest
                row["error"] = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {e}"[:300]
            _free(self.device)  # out of the except block: its traceback held the tensors
        self.results["runs"].append(row)
        self.save()
        print(f"[{self.args.budget_s - self.left():5.0f} s] {_line(row)}", file=sys.stderr)
        return row

    def save(self) -> None:
        Path(self.args.json).write_text(json.dumps(self.results, indent=2) + "\n")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def batch_search(run: Run, task: str, precision: str, first: dict, share: int = 1) -> int | None:
    """The largest batch that fits: ``first`` (batch ``--batch``) doubled until a run runs
    out of memory, fails, passes ``--max-batch`` or has used its ``1 / share`` of the time
    left."""
    if "images_per_s" not in first:
        return None
    largest, batch = first["batch"], first["batch"] * 2
    stop = time.monotonic() + run.left() / share
    limit = run.args.max_batch
    if task == "embed":  # three batches at least: one to warm up, two timed
        limit = min(limit, run.ctx["rows"] // 3)
    while batch <= limit and time.monotonic() < stop:
        row = run.one(task, batch, precision)
        if "images_per_s" not in row:
            break
        largest, batch = batch, batch * 2
    return largest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU check")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cpu":  # OpenMP threads spin 10x slower on busy cores
        torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    run = Run(args, device, tmp)
    try:
        samples = siim_like(args.samples, 8, args.frame_side)
        run.ctx["dataset"] = write_samples(tmp / "dataset", samples)
        run.ctx["rows"] = args.samples + 8
        first: dict[tuple[str, str], dict] = {}
        for precision in args.precisions:  # every task at batch 8 first: the core figures
            for task in args.tasks:
                first[task, precision] = run.one(task, args.batch, precision)
        if "segment" in args.tasks and not args.no_compile:
            compare_compiled(run, first["segment", args.precisions[0]])
        precision = args.precisions[0]  # the search in the first precision
        for i, task in enumerate(args.tasks):
            share = 2 * (len(args.tasks) - i)  # half of each task's share: the others' runs
            largest = batch_search(run, task, precision, first[task, precision], share)
            run.results["largest_batch"][task] = {"precision": precision, "batch": largest}
            for other in args.precisions[1:]:  # the others at that batch (the same memory)
                if largest and largest != args.batch:
                    run.one(task, largest, other)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run.save()
    print_table(run.results)
    print(f"results in {args.json}")
    return run.results


def compare_compiled(run: Run, eager: dict[str, Any]) -> None:
    """The segment task compiled, at the eager run's batch and precision."""
    compiled = run.one("segment", eager["batch"], eager["precision"], compiled=True)
    slow, fast = eager.get("images_per_s"), compiled.get("images_per_s")
    run.results["compile"]["segment"] = {
        "eager_images_per_s": slow, "compiled_images_per_s": fast,
        "speedup": round(fast / slow, 2) if fast and slow else None,
    }  # fmt: skip


def _settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "size": args.size, "first_batch": args.batch, "max_batch": args.max_batch,
        "warmup_steps": args.warmup, "timed_steps": args.steps, "workers": args.workers,
        "cpu_smoke": args.cpu_smoke, "torch": torch.__version__, "device": str(device),
        "cpu_count": os.cpu_count(), "precisions": args.precisions,
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def _line(row: dict[str, Any]) -> str:
    """One table line of a run."""

    def cell(key: str) -> str:
        value = row.get(key)
        return "-" if value is None else str(value)

    head = (
        f"{row['task']:<11} {row['precision']:<5} {row['batch']:>6} "
        f"{'yes' if row['compile'] else 'no':>8}"
    )
    if "images_per_s" not in row:
        return f"{head}  {row.get('skipped') or row.get('error') or row.get('note')}"
    return (
        f"{head} {cell('images_per_s'):>10} {cell('gpu_busy_pct'):>10} {cell('peak_memory_gib'):>9}"
    )


def print_table(results: dict[str, Any]) -> None:
    """Every run, one line each; then the largest batches and the compile speed-up."""
    print(
        f"{'task':<11} {'prec':<5} {'batch':>6} {'compiled':>8} {'images/s':>10} "
        f"{'GPU busy %':>10} {'peak GiB':>9}"
    )
    for row in results["runs"]:
        print(_line(row))
    for task, found in results["largest_batch"].items():
        print(f"largest batch that fits, {task} ({found['precision']}): {found['batch']}")
    for task, c in results["compile"].items():
        print(f"{task} compiled vs eager: {c['compiled_images_per_s']} vs "
              f"{c['eager_images_per_s']} images/s (x{c['speedup']})")  # fmt: skip


if __name__ == "__main__":
    main()
