"""``pneumo demo``: the main job on the embedded default, end to end."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from pneumo.commands.options import Size
from pneumo.commands.train import run_training, train_line
from pneumo.render import ProgressBar, fail_on_errors


@fail_on_errors
def demo_cmd(
    out: Annotated[
        str, typer.Option(help="Where the demo writes: folder or s3://bucket/prefix.")
    ] = "demo",
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
    typer.echo(
        f"1/4 wrote {demo.n_images} synthetic SIIM DICOMs ({demo.n_positive} positive) "
        f"under {demo.image_root}"
    )
    ingest_cfg = SiimConfig(
        dicom_root=str(demo.image_root),
        labels=demo.labels_csv,
        batch=BatchConfig(out=f"{root}/dataset", workers=2, split_fractions=(0.7, 0.15, 0.15)),
    )
    with ProgressBar("ingest siim", unit="img") as bar:
        batch = ingest_siim(ingest_cfg, progress=bar.update_to)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(batch.splits.items()))
    typer.echo(
        f"2/4 batch {batch.batch} already in {root}/dataset"
        if batch.already_committed
        else f"2/4 ingested {batch.ingested} ({splits}) into {root}/dataset"
    )
    run = f"{root}/runs/unet-r34-{size}px-{steps}steps-seed{seed}"
    epochs = max(1, steps // 50)
    train_cfg = SegmentConfig(
        dataset=f"{root}/dataset",
        out=run,
        size=size,
        epochs=epochs,
        steps_per_epoch=max(1, steps // epochs),
        warmup_steps=10,
        workers=1,
        seed=seed,
        resume="auto",
    )
    result = run_training(train_cfg)
    typer.echo(f"3/4 trained: {train_line(result or {})}")
    with ProgressBar("evaluate", unit="img") as bar:
        summary = evaluate_segment(
            EvaluateConfig(run=run, split="test", workers=1),
            progress=lambda p: bar.update_to(p["images"]),
        )
    typer.echo(
        f"4/4 evaluated the test split ({summary['n_images']} images, "
        f"{summary['n_positive']} positive):"
    )
    typer.echo(dice_table([("No additional pretrain (U-Net, ResNet-34)", summary)]))


def dice_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The report's Table 1 layout: model, SIIM Dice, and what stands behind it."""
    head = f"{'Model':<44} {'Dice':>6} {'Dice+':>6} {'Sens':>6} {'Spec':>6} {'images':>6}"
    lines = [head, "-" * len(head)]
    for name, s in rows:
        lines.append(
            f"{name:<44} {100 * s['dice']:6.1f} {100 * s['dice_pos']:6.1f} "
            f"{100 * s['sensitivity']:6.1f} {100 * s['specificity']:6.1f} "
            f"{s['n_images']:6d}"
        )
    return "\n".join(lines)
