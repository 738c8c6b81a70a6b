"""The commands that run models: ``train``, ``evaluate``, ``predict``, ``bench`` and ``demo``.

Registered on the app by importing this module (``pneumo.cli.main`` does). torch is only
imported inside the commands, so ``pneumo ingest`` and ``pneumo manifest`` start fast.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer

from pneumo.cli import app
from pneumo.render import ProgressBar, fail_on_errors
from shards.errors import ConfigError

train_app = typer.Typer(help="Train models from a dataset's shards.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Score a trained run.", no_args_is_help=True)
bench_app = typer.Typer(help="Measure throughput.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(bench_app, name="bench")

DatasetArg = Annotated[str, typer.Argument(help="Dataset: folder or s3://bucket/prefix.")]
RunArg = Annotated[str, typer.Argument(help="Run: folder or s3://bucket/prefix.")]
Size = Annotated[int, typer.Option(help="Square input side in pixels (multiple of 32).")]
BatchSize = Annotated[int, typer.Option(help="Images per step (per process).", min=1)]
LoaderWorkers = Annotated[int, typer.Option(help="Loader processes per training process.",
                                            min=0)]
Tta = Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")]
Checkpoint = Annotated[str, typer.Option(help="best | last | URL of a checkpoint file.")]


def parse_pos_rate(text: str | None) -> tuple[float, float] | None:
    """``0.8:0.4`` (sliding), ``0.5`` (fixed) or ``none`` (the data's own rate)."""
    if text is None or text.lower() == "none":
        return None
    try:
        parts = [float(x) for x in text.split(":")]
    except ValueError as e:
        raise ConfigError(f"--pos-rate {text!r}: expected A or A:B, e.g. 0.8:0.4") from e
    if len(parts) not in (1, 2):
        raise ConfigError(f"--pos-rate {text!r}: expected A or A:B, e.g. 0.8:0.4")
    return (parts[0], parts[-1])


@train_app.command("segment")
@fail_on_errors
def train_segment_cmd(
    dataset: DatasetArg,
    out: Annotated[str, typer.Option(help="Run folder or s3:// prefix for checkpoints, "
                                     "metrics and plots.")],
    where: Annotated[str | None, typer.Option(help="Training rows (manifest filter). Default: "
                                              "labelled SIIM train split.")] = None,
    val_where: Annotated[str | None, typer.Option(help="Validation rows. Default: labelled "
                                                  "SIIM val split.")] = None,
    size: Size = 512,
    batch_size: BatchSize = 8,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    epochs: Annotated[int, typer.Option(help="Epochs.", min=1)] = 10,
    steps_per_epoch: Annotated[int | None, typer.Option(
        help="Steps per epoch. Default: training rows // (batch size x processes).")] = None,
    workers: LoaderWorkers = 2,
    encoder_init: Annotated[str | None, typer.Option(
        help="ResNet-34 weights for the encoder: our classifier checkpoint, or a "
        "torchvision/timm state dict (file or s3://).")] = None,
    pos_rate: Annotated[str, typer.Option(
        help="Share of positive images per batch: A:B slides from A to B over training, A "
        "is fixed, 'none' keeps the data's rate.")] = "0.8:0.4",
    seed: Annotated[int, typer.Option(help="Seed for init, sampling and augmentation.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its "
                                         "last checkpoint.")] = False,
    in_channels: Annotated[int, typer.Option(help="1 (grey) or 3 (grey replicated).")] = 1,
    focal_weight: Annotated[float, typer.Option(help="Weight of the focal loss.")] = 10.0,
    dice_weight: Annotated[float, typer.Option(help="Weight of the dice loss.")] = 1.0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.", min=1)]
    = 500,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.", min=0)] = 100,
) -> None:
    """Train the U-Net (ResNet-34 encoder) on a dataset's shards; torchrun for several GPUs."""
    from training.segment import SegmentConfig

    cfg = SegmentConfig(
        dataset=dataset, out=out, size=size, batch_size=batch_size, lr=lr, epochs=epochs,
        steps_per_epoch=steps_per_epoch, workers=workers, encoder_init=encoder_init,
        pos_rate=parse_pos_rate(pos_rate), seed=seed, resume=resume, in_channels=in_channels,
        focal_weight=focal_weight, dice_weight=dice_weight, checkpoint_every=checkpoint_every,
        warmup_steps=warmup_steps, **_given(where=where, val_where=val_where),
    )
    result = _train(cfg)
    if result is not None:
        typer.echo(_train_line(result))


def _given(**options: Any) -> dict[str, Any]:
    """Only the options the user gave, so the config's defaults stay in one place."""
    return {k: v for k, v in options.items() if v is not None}


def _train(cfg: Any) -> dict[str, Any] | None:
    from training.runs import DistEnv
    from training.segment import train_segment

    if DistEnv.from_env().rank != 0:  # one progress bar and one log, from rank 0
        logging.getLogger().setLevel(logging.WARNING)
        train_segment(cfg)
        return None
    with ProgressBar("train segment", unit="step") as bar:
        return train_segment(cfg, progress=lambda p: bar.update_to(
            p["step"], p["total"], loss=f"{p['loss']:.4f}", img_s=f"{p['images_per_s']:.1f}"))


def _train_line(result: dict[str, Any]) -> str:
    return (f"step {result.get('step')}/{result.get('total_steps')}, val Dice "
            f"{result.get('val_dice', float('nan')):.4f} at p > 0.5, "
            f"{result.get('postprocess_val_dice', float('nan')):.4f} with the post-processing "
            f"chosen on val -> {result.get('run')}")


@evaluate_app.command("segment")
@fail_on_errors
def evaluate_segment_cmd(
    run: RunArg,
    dataset: Annotated[str | None, typer.Argument(help="Dataset (default: the run's).")] = None,
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    where: Annotated[str | None, typer.Option(help="Rows to score instead of --split.")] = None,
    tta: Tta = False,
    checkpoint: Checkpoint = "best",
    workers: LoaderWorkers = 2,
    batch_size: BatchSize = 8,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Score a segmentation run with the SIIM Dice (and the classification view)."""
    from evaluation.evaluate import EvaluateConfig, evaluate_segment

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: expected table or json")
    cfg = EvaluateConfig(run=run, dataset=dataset, split=split, where=where, tta=tta,
                         checkpoint=checkpoint, workers=workers, batch_size=batch_size)
    with ProgressBar("evaluate", unit="img") as bar:
        summary = evaluate_segment(cfg, progress=lambda p: bar.update_to(p["images"]))
    if fmt == "json":
        typer.echo(json.dumps(summary, default=str))
    else:
        print_summary(summary, sys.stdout)


def print_summary(summary: dict[str, Any], out: Any) -> None:
    rows = [(k, v) for k, v in summary.items() if isinstance(v, int | float | str)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.write(f"{k.ljust(width)}  {v:.4f}\n" if isinstance(v, float) else
                  f"{k.ljust(width)}  {v}\n")


@app.command("predict")
@fail_on_errors
def predict_cmd(
    run: RunArg,
    input: Annotated[str, typer.Argument(help="A .dcm file, a folder, or an s3:// prefix.")],
    out: Annotated[str, typer.Option(help="Submission CSV to write (ImageId,EncodedPixels).")],
    overlays: Annotated[str | None, typer.Option(help="Folder for mask-over-image PNGs.")]
    = None,
    tta: Tta = False,
    checkpoint: Checkpoint = "best",
    batch_size: BatchSize = 8,
) -> None:
    """Predict pneumothorax masks for DICOMs and write a SIIM submission CSV."""
    from evaluation.predict import PredictConfig, predict

    cfg = PredictConfig(run=run, input=input, out_csv=out, overlays_dir=overlays, tta=tta,
                        checkpoint=checkpoint, batch_size=batch_size)
    with ProgressBar("predict", unit="img") as bar:
        summary = predict(cfg, progress=lambda p: bar.update_to(p["done"], p["total"]))
    typer.echo(f"{summary['n_images']} images, {summary['n_positive']} with pneumothorax -> "
               f"{out}")
    for failure in summary["failed"]:
        typer.echo(f"skipped {failure['source']}: {failure['reason']}", err=True)


@bench_app.command("loader")
@fail_on_errors
def bench_loader_cmd(
    dataset: DatasetArg,
    size: Size = 512,
    workers: LoaderWorkers = 2,
    batch_size: BatchSize = 8,
    seconds: Annotated[float, typer.Option(help="How long to measure.", min=0.5)] = 20.0,
    where: Annotated[str | None, typer.Option(help="Rows to stream (manifest filter).")]
    = None,
) -> None:
    """Samples/s of the training stream: read + decode + resize + augment (last line)."""
    from training.data import LoaderConfig, bench_loader

    cfg = LoaderConfig(dataset=dataset, where=where, size=size, batch_size=batch_size,
                       workers=workers)
    with ProgressBar("bench loader", unit="s") as bar:
        rate = bench_loader(cfg, seconds, progress=lambda done, total: bar.update_to(
            int(done), int(total)))
    typer.echo(f"samples/s: {rate:.1f}")


@app.command("demo")
@fail_on_errors
def demo_cmd(
    out: Annotated[str, typer.Option(help="Where the demo writes: folder or s3://bucket/prefix.")]
    = "demo",
    n: Annotated[int, typer.Option(help="Synthetic SIIM images.", min=16)] = 200,
    size: Size = 128,
    steps: Annotated[int, typer.Option(help="Training steps.", min=1)] = 150,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """The main job on the embedded default: synthetic SIIM batch -> ingest -> train ->
    evaluate, printing the Dice table (a few minutes on a 2-core CPU)."""
    from pathlib import Path

    from evaluation.evaluate import EvaluateConfig, evaluate_segment
    from ingest.batch import BatchConfig
    from ingest.demo import write_siim_demo
    from ingest.siim import SiimConfig, ingest_siim
    from training.segment import SegmentConfig

    root = out.rstrip("/")
    raw = Path("demo-raw") if root.startswith("s3://") else Path(root) / "raw"
    with ProgressBar("demo-data siim", unit="img", total=n) as bar:
        demo = write_siim_demo(raw, n=n, seed=seed, progress=bar.update_to)
    typer.echo(f"1/4 wrote {demo.n_images} synthetic SIIM DICOMs ({demo.n_positive} positive) "
               f"under {demo.image_root}")
    ingest_cfg = SiimConfig(dicom_root=str(demo.image_root), labels=demo.labels_csv,
                            batch=BatchConfig(out=f"{root}/dataset", workers=2,
                                              split_fractions=(0.7, 0.15, 0.15)))
    with ProgressBar("ingest siim", unit="img") as bar:
        batch = ingest_siim(ingest_cfg, progress=bar.update_to)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(batch.splits.items()))
    typer.echo(f"2/4 batch {batch.batch} already in {root}/dataset" if batch.already_committed
               else f"2/4 ingested {batch.ingested} ({splits}) into {root}/dataset")
    run = f"{root}/runs/unet-r34-{size}px-{steps}steps-seed{seed}"
    epochs = max(1, steps // 50)
    train_cfg = SegmentConfig(dataset=f"{root}/dataset", out=run, size=size, epochs=epochs,
                              steps_per_epoch=max(1, steps // epochs), warmup_steps=10,
                              workers=1, seed=seed,
                              resume=_has_checkpoint(run))
    result = _train(train_cfg)
    typer.echo(f"3/4 trained: {_train_line(result or {})}")
    with ProgressBar("evaluate", unit="img") as bar:
        summary = evaluate_segment(EvaluateConfig(run=run, split="test", workers=1),
                                   progress=lambda p: bar.update_to(p["images"]))
    typer.echo(f"4/4 evaluated the test split ({summary['n_images']} images, "
               f"{summary['n_positive']} positive):")
    typer.echo(dice_table([("No additional pretrain (U-Net, ResNet-34)", summary)]))


def _has_checkpoint(run: str) -> bool:
    from shards.store import open_store

    return open_store(run).exists("checkpoints/last.pt")


def dice_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The report's Table 1 layout: model, SIIM Dice, and what stands behind it."""
    head = f"{'Model':<44} {'Dice':>6} {'Dice+':>6} {'Sens':>6} {'Spec':>6} {'images':>6}"
    lines = [head, "-" * len(head)]
    for name, s in rows:
        lines.append(f"{name:<44} {100 * s['dice']:6.1f} {100 * s['dice_pos']:6.1f} "
                     f"{100 * s['sensitivity']:6.1f} {100 * s['specificity']:6.1f} "
                     f"{s['n_images']:6d}")
    return "\n".join(lines)
