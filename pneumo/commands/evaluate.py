"""``pneumo evaluate ...`` and ``pneumo predict``: trained runs into numbers and masks."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from pneumo.commands.options import Checkpoint, RunArg
from pneumo.render import ProgressBar, fail_on_errors
from pneumo.shards.errors import ConfigError

app = typer.Typer(help="Score a trained run.", no_args_is_help=True)

# Inference words, not training words: these commands never train.
InferBatchSize = Annotated[
    int, typer.Option("--batch-size", help="Images per forward pass of the model.", min=1)
]
ReadWorkers = Annotated[
    int,
    typer.Option(
        "--workers", help="Processes reading and decoding the shards (0: in this one).", min=0
    ),
]
TtaChoice = Annotated[
    bool | None,
    typer.Option(
        "--tta/--no-tta",
        help="Average with the horizontally flipped image. Default: as the run's "
        "post-processing was chosen on val (postprocess.json); either setting is applied "
        "with the triplet searched under it.",
        show_default=False,
    ),
]
Calibrate = Annotated[
    bool,
    typer.Option(
        "--calibrate",
        help="First fit a temperature on the run's val split (never the scored split), store "
        "it in RUN/calibration.json (pneumo predict applies it), and report the ECE after it.",
    ),
]


@app.command("segment")
@fail_on_errors
def evaluate_segment_cmd(
    run: RunArg,
    dataset_arg: Annotated[
        str | None,
        typer.Argument(metavar="DATASET", help="Dataset to score on (default: the run's)."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset", help="The same as DATASET (e.g. where the run's dataset has moved to)."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    where: Annotated[str | None, typer.Option(help="Rows to score instead of --split.")] = None,
    tta: TtaChoice = None,
    calibrate: Calibrate = False,
    checkpoint: Checkpoint = "best",
    workers: ReadWorkers = 2,
    batch_size: InferBatchSize = 8,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Score a segmentation run with the SIIM Dice at full resolution, beside the score of
    predicting nothing (and the classification view)."""
    from pneumo.evaluation.evaluate import EvaluateConfig, evaluate_segment
    from pneumo.evaluation.report import summary_text

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: expected table or json")
    if dataset_arg and dataset and dataset_arg != dataset:
        raise ConfigError(f"DATASET {dataset_arg} and --dataset {dataset} differ: give one")
    cfg = EvaluateConfig(
        run=run,
        dataset=dataset or dataset_arg,
        split=split,
        where=where,
        tta=tta,
        calibrate=calibrate,
        checkpoint=checkpoint,
        workers=workers,
        batch_size=batch_size,
    )
    with ProgressBar("evaluate", unit="img") as bar:
        summary = evaluate_segment(cfg, progress=lambda p: bar.update_to(p["images"]))
    summary = {**summary, "init": _init_line(run, checkpoint)}
    if fmt == "json":
        typer.echo(json.dumps(summary, default=str))
    else:
        typer.echo(summary_text(run.rstrip("/").rsplit("/", 1)[-1], summary))
        typer.echo(f"encoder init: {summary['init']}")


def _init_line(run: str, checkpoint: str) -> str:
    """Where the evaluated weights started: the checkpoint's init chain, in one line."""
    from pneumo.training.checkpoint import init_line, load_checkpoint

    return init_line(load_checkpoint(run, checkpoint).get("init", []))


@app.command("classify")
@fail_on_errors
def evaluate_classify_cmd(
    run: RunArg,
    dataset: Annotated[str | None, typer.Argument(help="Dataset (default: the run's).")] = None,
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    where: Annotated[str | None, typer.Option(help="Rows to score instead of --split.")] = None,
    calibrate: Calibrate = False,
    checkpoint: Checkpoint = "best",
    workers: ReadWorkers = 2,
    batch_size: InferBatchSize = 32,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Score a classify run: AUROC, accuracy beside the majority-class rate, ROC curve."""
    from pneumo.evaluation.classify import EvaluateClassifyConfig, evaluate_classify

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: expected table or json")
    cfg = EvaluateClassifyConfig(
        run=run,
        dataset=dataset,
        split=split,
        where=where,
        calibrate=calibrate,
        checkpoint=checkpoint,
        workers=workers,
        batch_size=batch_size,
    )
    with ProgressBar("evaluate", unit="img") as bar:
        summary = evaluate_classify(cfg, progress=lambda p: bar.update_to(p["images"]))
    if fmt == "json":
        typer.echo(json.dumps(summary, default=str))
        return
    print_summary(summary, sys.stdout)
    typer.echo(
        "(majority_rate: the accuracy of always guessing the most frequent class; "
        "balanced_accuracy and auroc are 0.5 for that guess)"
    )


def print_summary(summary: dict[str, Any], out: Any) -> None:
    rows = [(k, v) for k, v in summary.items() if isinstance(v, int | float | str)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.write(
            f"{k.ljust(width)}  {v:.4f}\n" if isinstance(v, float) else f"{k.ljust(width)}  {v}\n"
        )


@fail_on_errors
def predict_cmd(
    run: RunArg,
    input: Annotated[str, typer.Argument(help="A .dcm file, a folder, or an s3:// prefix.")],
    out: Annotated[str, typer.Option(help="Submission CSV to write (ImageId,EncodedPixels).")],
    overlays: Annotated[
        str | None,
        typer.Option(help="Folder for full-resolution mask-over-image PNGs, captioned."),
    ] = None,
    seg_out: Annotated[
        str | None,
        typer.Option(
            "--seg-out",
            help="Folder or s3:// prefix for one DICOM Segmentation per input "
            "(<SOPInstanceUID>.dcm), its frame the CSV row's mask, referencing its source.",
        ),
    ] = None,
    tta: TtaChoice = None,
    checkpoint: Checkpoint = "best",
    batch_size: InferBatchSize = 8,
) -> None:
    """Predict pneumothorax masks for DICOMs and write a SIIM submission CSV (reads the
    run and the DICOMs only, never a dataset: a moved dataset does not matter here)."""
    from pneumo.evaluation.predict import PredictConfig, predict

    cfg = PredictConfig(
        run=run,
        input=input,
        out_csv=out,
        overlays_dir=overlays,
        seg_dir=seg_out,
        tta=tta,
        checkpoint=checkpoint,
        batch_size=batch_size,
    )
    with ProgressBar("predict", unit="img") as bar:
        summary = predict(cfg, progress=lambda p: bar.update_to(p["done"], p["total"]))
    typer.echo(f"{summary['n_images']} images, {summary['n_positive']} with pneumothorax -> {out}")
    scaled = f"temperature {summary['temperature']:.3f}" if summary["temperature"] else "none"
    typer.echo(f"per-image probability, calibrated ({scaled}), uncertainty -> "
               f"{summary['details_csv']}")  # fmt: skip
    for failure in summary["failed"]:
        typer.echo(f"skipped {failure['source']}: {failure['reason']}", err=True)
    if seg_out is not None:
        typer.echo(f"{summary['n_seg']} DICOM SEGs -> {seg_out}")
    for failure in summary["seg_failed"]:
        typer.echo(f"no SEG for {failure['source']}: {failure['reason']}", err=True)
