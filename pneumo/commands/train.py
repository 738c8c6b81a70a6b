"""``pneumo train ...``: training commands (one process, or one of torchrun's)."""

from __future__ import annotations

import logging
import math
import sys
from typing import Annotated, Any

import typer
from tqdm import tqdm

from pneumo.commands.options import BatchSize, DatasetArg, Size
from pneumo.render import ProgressBar, fail_on_errors
from pneumo.shards.errors import ConfigError

app = typer.Typer(help="Train models from a dataset's shards.", no_args_is_help=True)

Out = Annotated[
    str, typer.Option(help="Run folder or s3:// prefix for checkpoints, metrics and plots.")
]
Epochs = Annotated[int, typer.Option(help="Epochs.", min=1)]
StepsPerEpoch = Annotated[
    int | None,
    typer.Option(help="Steps per epoch. Default: training rows // (batch size x processes)."),
]
Seed = Annotated[int, typer.Option(help="Seed for init, sampling and augmentation.")]
Resume = Annotated[
    str,
    typer.Option(
        help="auto: continue the run in --out if it holds a checkpoint, else start fresh; "
        "never: refuse an --out that holds one; always: it must hold one.",
    ),
]
InChannels = Annotated[int, typer.Option(help="1 (grey) or 3 (grey replicated).")]
CheckpointEvery = Annotated[
    int,
    typer.Option(
        help="Steps between last.pt checkpoints (also written at each epoch end, and at the "
        "step reached on Ctrl-C or SIGTERM).",
        min=1,
    ),
]
PreciseBN = Annotated[
    int,
    typer.Option(
        help="Re-estimate BatchNorm statistics over this many training batches before each "
        "validation (0: keep the running averages, which lag the weights in short runs).",
        min=0,
    ),
]
TrainWorkers = Annotated[
    int | None,
    typer.Option(
        help="Loader processes per training process; they shape the batches, so a resume "
        "keeps the run's. Default: the CPUs this process may use (affinity and cgroup quota) "
        "shared by the node's processes (LOCAL_WORLD_SIZE), less one for the process itself, "
        "1 to 16.",
        min=0,
    ),
]
Precision = Annotated[
    str,
    typer.Option(
        help="bf16 | fp16 | fp32: the autocast of the training step, PreciseBN and validation "
        "on GPU. fp16 scales the loss (its GradScaler is saved in checkpoints; it reads the "
        "GPU every step). On CPU everything runs in fp32 whatever this says. A resume must "
        "give the run's.",
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the model for the training step (the first steps wait for the "
        "compiler; checkpoints hold the plain module's weights).",
    ),
]
LogEvery = Annotated[
    int | None,
    typer.Option(
        help="Steps between the training-loss readings of the progress bar (each waits for "
        "the GPU to finish the steps queued). Default: 1000 // (batch size x processes), "
        "about one a second at 1,000 images/s.",
        min=1,
    ),
]
AllowOverlap = Annotated[
    bool,
    typer.Option(
        "--allow-overlap",
        help="Train even when training patients are in the SIIM val/test rows (recorded).",
    ),
]


CacheDir = Annotated[
    str | None,
    typer.Option(
        help="Keep an s3:// dataset's shards in this local folder: the first epoch downloads "
        "each shard once per node, later epochs read the copy (shared by the node's "
        "processes; least recently used shards go first). Default: read the store every epoch.",
    ),
]
CacheLimit = Annotated[
    str, typer.Option(help="Most the --cache-dir may hold: bytes, or with K, M, G or T (GiB...).")
]
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """``50G`` -> bytes (K, M, G, T are powers of 1024; a plain number is bytes)."""
    number, unit = text.strip().upper().rstrip("IB") or "0", ""
    if number[-1:] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = -1
    if value < 1:
        raise ConfigError(f"--cache-limit {text!r}: expected a size like 50G or 2000000000")
    return int(value)


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
    out: Out,
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
    epochs: Epochs = 10,
    steps_per_epoch: StepsPerEpoch = None,
    workers: TrainWorkers = None,
    encoder_init: Annotated[
        str | None,
        typer.Option(
            help="Encoder weights on a fresh start: a `train classify` RUN (its best.pt), a "
            "checkpoint, or a torchvision/timm ResNet state dict (file or s3://)."
        ),
    ] = None,
    pos_rate: Annotated[
        str,
        typer.Option(
            help="Share of positive images per batch: A:B slides from A to B over training, A "
            "is fixed, 'none' keeps the data's rate."
        ),
    ] = "0.8:0.4",
    seed: Seed = 0,
    resume: Resume = "auto",
    in_channels: InChannels = 1,
    focal_weight: Annotated[float, typer.Option(help="Weight of the focal loss.")] = 10.0,
    dice_weight: Annotated[float, typer.Option(help="Weight of the dice loss.")] = 1.0,
    checkpoint_every: CheckpointEvery = 500,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.", min=0)] = 100,
    precise_bn: PreciseBN = 0,
    precision: Precision = "bf16",
    compile: Compile = False,
    log_every: LogEvery = None,
    cache_dir: CacheDir = None,
    cache_limit: CacheLimit = "50G",
    allow_overlap: AllowOverlap = False,
) -> None:
    """Train the U-Net (ResNet-34 encoder) on a dataset's shards; torchrun for several GPUs."""
    from pneumo.training.segment import SegmentConfig

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
        precise_bn=precise_bn,
        precision=precision,
        cache_dir=cache_dir,
        cache_limit=parse_size(cache_limit),
        compile=compile,
        log_every=log_every,
        allow_overlap=allow_overlap,
        **_given(where=where, val_where=val_where),
    )
    result = run_training(cfg)
    if result is not None:
        typer.echo(train_line(result))


@app.command("classify")
@fail_on_errors
def train_classify_cmd(
    dataset: DatasetArg,
    out: Out,
    where: Annotated[
        str | None, typer.Option(help="Training rows. Default: the NIH train split.")
    ] = None,
    val_where: Annotated[
        str | None, typer.Option(help="Validation rows. Default: the NIH val split.")
    ] = None,
    labels: Annotated[
        str,
        typer.Option(
            help="'has_ptx' (pneumothorax yes/no), or a Parquet label table (file, folder or "
            "s3://) with columns key and label (int), joined by key."
        ),
    ] = "has_ptx",
    size: Size = 512,
    batch_size: BatchSize = 32,
    arch: Annotated[str, typer.Option(help="resnet18 | resnet34 | resnet50.")] = "resnet34",
    optimizer: Annotated[str, typer.Option(help="sgd | adam.")] = "sgd",
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    plateau_patience: Annotated[
        int, typer.Option(help="Epochs without val-loss improvement before lowering the lr.")
    ] = 5,
    plateau_factor: Annotated[float, typer.Option(help="Factor that lowers the lr.")] = 0.1,
    balance: Annotated[
        str,
        typer.Option(
            help="How batches mix classes: 'classes' (each class equally often), "
            "'pos-rate:0.5' (positives at that rate; 'pos-rate:0.8:0.4' slides from 0.8 to "
            "0.4 over training; two classes), 'none' (as in the data)."
        ),
    ] = "classes",
    epochs: Epochs = 10,
    steps_per_epoch: StepsPerEpoch = None,
    in_channels: InChannels = 1,
    workers: TrainWorkers = None,
    seed: Seed = 0,
    resume: Resume = "auto",
    checkpoint_every: CheckpointEvery = 500,
    precise_bn: PreciseBN = 16,
    precision: Precision = "bf16",
    compile: Compile = False,
    log_every: LogEvery = None,
    cache_dir: CacheDir = None,
    cache_limit: CacheLimit = "50G",
    allow_overlap: AllowOverlap = False,
) -> None:
    """Train a ResNet classifier (pneumothorax, or a label table's classes) for pretraining."""
    from pneumo.training.classify import ClassifyConfig, train_classify

    cfg = ClassifyConfig(
        dataset=dataset,
        out=out,
        labels=labels,
        size=size,
        batch_size=batch_size,
        arch=arch,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        plateau_patience=plateau_patience,
        plateau_factor=plateau_factor,
        balance=balance,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        in_channels=in_channels,
        workers=workers,
        seed=seed,
        resume=resume,
        checkpoint_every=checkpoint_every,
        precise_bn=precise_bn,
        precision=precision,
        cache_dir=cache_dir,
        cache_limit=parse_size(cache_limit),
        compile=compile,
        log_every=log_every,
        allow_overlap=allow_overlap,
        **_given(where=where, val_where=val_where),
    )
    result = run_training(cfg, train_classify)
    if result is not None:
        typer.echo(train_line(result))


def _given(**options: Any) -> dict[str, Any]:
    """Only the options the user gave, so the config's defaults stay in one place."""
    return {k: v for k, v in options.items() if v is not None}


def run_training(cfg: Any, train: Any = None) -> dict[str, Any] | None:
    """``train(cfg)`` (default: ``train_segment``) with progress on rank 0; other ranks
    log warnings only."""
    from pneumo.training.runs import DistEnv

    if train is None:
        from pneumo.training.segment import train_segment as train

    if DistEnv.from_env().rank != 0:  # one progress bar and one log, from rank 0
        logging.getLogger().setLevel(logging.WARNING)
        train(cfg)
        return None
    with ProgressBar(f"train {cfg.out.rstrip('/').rsplit('/', 1)[-1]}", unit="step") as bar:
        return train(cfg, progress=TrainProgress(bar))


class TrainProgress:
    """Renders the loop's progress: the bar (epoch, step, loss, images/s) on a terminal, and
    one line per epoch with the validation figures (the only output without a terminal).

    The bar moves every step; loss and images/s change at the loop's readings (every
    ``--log-every`` steps: the mean of the steps since the one before)."""

    def __init__(self, bar: ProgressBar) -> None:
        self.bar = bar
        self.postfix: dict[str, str] = {}

    def __call__(self, p: dict[str, Any]) -> None:
        if p.get("event") == "epoch":
            tqdm.write(epoch_line(p), file=sys.stderr)
            return
        self.postfix["epoch"] = f"{p['epoch'] + 1}/{p['epochs']}"
        if "loss" in p:
            self.postfix["loss"] = f"{p['loss']:.4f}"
            self.postfix["img_s"] = f"{p['images_per_s']:.1f}"
        self.bar.update_to(p["step"], p["total"], **self.postfix)


def epoch_line(p: dict[str, Any]) -> str:
    """``epoch 2/10 step 200 train_loss 0.41 val_loss 0.52 val_auroc 0.81 ... 95.2 img/s``."""
    figures = "  ".join(f"{k} {_fmt(p.get(k))}" for k in p.get("headline", ()))
    return (
        f"epoch {p['epoch'] + 1}/{p['epochs']}  step {p['step']}  {figures}  "
        f"lr {p['lr']:.3g}  {p['images_per_s']:.1f} img/s"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def train_line(result: dict[str, Any]) -> str:
    """The last line of a training command: where the run is and how good it got."""
    head = f"step {result.get('step')}/{result.get('total_steps')}"
    if result.get("task") == "classify":
        return (
            f"{head}, val AUROC {_fmt(result.get('val_auroc'))} (best "
            f"{_fmt(result.get('best_score'))}), balanced accuracy "
            f"{_fmt(result.get('val_balanced_accuracy'))}, accuracy "
            f"{_fmt(result.get('val_accuracy'))} vs majority rate "
            f"{_fmt(result.get('val_majority_rate'))} -> {result.get('run')}"
        )
    return (
        f"{head}, val Dice {_fmt(result.get('val_dice'))} at p > 0.5, "
        f"{_fmt(result.get('postprocess_val_dice'))} with the post-processing "
        f"chosen on val -> {result.get('run')}"
    )
