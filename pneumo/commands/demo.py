"""``pneumo demo``: the report in miniature, on synthetic SIIM and NIH data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumo.commands.experiment import (
    ArmsOption,
    DevicesOption,
    ExecutorOption,
    ParallelOption,
    ResumeOption,
    SeedsOption,
    executor_config,
    parse_arms,
    print_result,
    run_with_progress,
)
from pneumo.render import ProgressBar, fail_on_errors


@fail_on_errors
def demo_cmd(
    out: Annotated[
        str, typer.Option(help="Where the demo writes: folder or s3://bucket/prefix.")
    ] = "demo",
    seeds: SeedsOption = None,
    arms: ArmsOption = None,
    n_nih: Annotated[int, typer.Option(help="Synthetic NIH images.", min=100)] = 400,
    n_siim: Annotated[int, typer.Option(help="SIIM images drawn from them.", min=50)] = 200,
    size: Annotated[int, typer.Option(help="Stored image side in pixels.", min=64)] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
    resume: ResumeOption = "auto",
    executor: ExecutorOption = "local",
    parallel: ParallelOption = 1,
    devices: DevicesOption = None,
) -> None:
    """The report in miniature: synthetic NIH and SIIM data (SIIM images are NIH images, as
    in the real data sets) -> one dataset split by patient -> `pneumo experiment` with the
    demo recipe, printing Table 1 (under 10 minutes on a 2-core CPU)."""
    import shlex
    import sys

    from pneumo.experiment.demo import DemoDataConfig, make_demo_dataset
    from pneumo.experiment.recipe import load_recipe
    from pneumo.experiment.run import ExperimentConfig

    root = out.rstrip("/")
    data_cfg = DemoDataConfig(
        raw=Path("demo-raw") if root.startswith("s3://") else Path(root) / "raw",
        dataset=f"{root}/dataset",
        n_nih=n_nih,
        n_siim=n_siim,
        size=size,
        seed=seed,
    )
    bars: dict[str, ProgressBar] = {}

    def show(p: dict) -> None:
        if p["phase"] not in bars:
            for bar in bars.values():
                bar.bar.close()
            bars[p["phase"]] = ProgressBar(str(p["phase"]), unit="img")
        bars[p["phase"]].update_to(p["done"], p["total"])

    try:
        data = make_demo_dataset(data_cfg, progress=show)
    finally:
        for bar in bars.values():
            bar.bar.close()
    pair = data.pair
    typer.echo(
        f"1/3 wrote {pair.nih.n_images} NIH PNGs ({pair.nih.n_positive} with pneumothorax) and "
        f"{pair.siim.n_images} SIIM DICOMs drawn from them ({pair.siim.n_positive} positive), "
        f"linked by {pair.xref}"
    )
    counts = [
        f"{name}: " + ("already in" if b.already_committed else _splits(b.splits))
        for name, b in (("nih", data.nih), ("siim", data.siim))
    ]
    typer.echo(f"2/3 ingested into {data_cfg.dataset}, split by patient ({'; '.join(counts)})")
    typer.echo("3/3 the experiment, demo recipe:")
    cfg = ExperimentConfig(
        dataset=data_cfg.dataset,
        out=f"{root}/experiment",
        recipe=load_recipe("demo"),
        seeds=seeds,
        arms=parse_arms(arms),
        resume=resume,
        command="pneumo " + shlex.join(sys.argv[1:]),
        executor=executor_config(executor, parallel, devices),
    )
    print_result(run_with_progress(cfg))


def _splits(splits: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(splits.items()))
