"""``pneumo train ...``: training commands (one process, or one of torchrun's)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from pneumo.commands.options import BatchSize, DatasetArg, LoaderWorkers, Size
from pneumo.render import ProgressBar, fail_on_errors
from shards.errors import ConfigError

app = typer.Typer(help="Train models from a dataset's shards.", no_args_is_help=True)


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


@app.command("segment")
@fail_on_errors
def train_segment_cmd(
    dataset: DatasetArg,
    out: Annotated[
        str, typer.Option(help="Run folder or s3:// prefix for checkpoints, metrics and plots.")
    ],
    where: Annotated[
        str | None,
        typer.Option(help="Training rows (manifest filter). Default: labelled SIIM train split."),
    ] = None,
    val_where: Annotated[
        str | None, typer.Option(help="Validation rows. Default: labelled SIIM val split.")
    ] = None,
    size: Size = 512,
    batch_size: BatchSize = 8,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    epochs: Annotated[int, typer.Option(help="Epochs.", min=1)] = 10,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option(help="Steps per epoch. Default: training rows // (batch size x processes)."),
    ] = None,
    workers: LoaderWorkers = 2,
    encoder_init: Annotated[
        str | None,
        typer.Option(
            help="ResNet-34 weights for the encoder: our classifier checkpoint, or a "
            "torchvision/timm state dict (file or s3://)."
        ),
    ] = None,
    pos_rate: Annotated[
        str,
        typer.Option(
            help="Share of positive images per batch: A:B slides from A to B over training, A "
            "is fixed, 'none' keeps the data's rate."
        ),
    ] = "0.8:0.4",
    seed: Annotated[int, typer.Option(help="Seed for init, sampling and augmentation.")] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    in_channels: Annotated[int, typer.Option(help="1 (grey) or 3 (grey replicated).")] = 1,
    focal_weight: Annotated[float, typer.Option(help="Weight of the focal loss.")] = 10.0,
    dice_weight: Annotated[float, typer.Option(help="Weight of the dice loss.")] = 1.0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.", min=1)] = 500,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.", min=0)] = 100,
) -> None:
    """Train the U-Net (ResNet-34 encoder) on a dataset's shards; torchrun for several GPUs."""
    from training.segment import SegmentConfig

    cfg = SegmentConfig(
        dataset=dataset,
        out=out,
        size=size,
        batch_size=batch_size,
        lr=lr,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        workers=workers,
        encoder_init=encoder_init,
        pos_rate=parse_pos_rate(pos_rate),
        seed=seed,
        resume=resume,
        in_channels=in_channels,
        focal_weight=focal_weight,
        dice_weight=dice_weight,
        checkpoint_every=checkpoint_every,
        warmup_steps=warmup_steps,
        **_given(where=where, val_where=val_where),
    )
    result = run_training(cfg)
    if result is not None:
        typer.echo(train_line(result))


def _given(**options: Any) -> dict[str, Any]:
    """Only the options the user gave, so the config's defaults stay in one place."""
    return {k: v for k, v in options.items() if v is not None}


def run_training(cfg: Any) -> dict[str, Any] | None:
    from training.runs import DistEnv
    from training.segment import train_segment

    if DistEnv.from_env().rank != 0:  # one progress bar and one log, from rank 0
        logging.getLogger().setLevel(logging.WARNING)
        train_segment(cfg)
        return None
    with ProgressBar("train segment", unit="step") as bar:
        return train_segment(
            cfg,
            progress=lambda p: bar.update_to(
                p["step"], p["total"], loss=f"{p['loss']:.4f}", img_s=f"{p['images_per_s']:.1f}"
            ),
        )


def train_line(result: dict[str, Any]) -> str:
    return (
        f"step {result.get('step')}/{result.get('total_steps')}, val Dice "
        f"{result.get('val_dice', float('nan')):.4f} at p > 0.5, "
        f"{result.get('postprocess_val_dice', float('nan')):.4f} with the post-processing "
        f"chosen on val -> {result.get('run')}"
    )
