"""``pneumo demo``: the report in miniature, on synthetic SIIM and NIH data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumo.commands.experiment import (
    ArmsOption,
    ResumeOption,
    SeedsOption,
    parse_arms,
    print_result,
    run_with_progress,
)
from pneumo.render import ProgressBar, fail_on_errors

# The demo's split policy: NIH's official-style lists put 20% of patients in test; the
# rest go to train and val 70:15 (ingest rescales), and SIIM images follow their patients.
DEMO_FRACTIONS = (0.7, 0.15, 0.15)


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
) -> None:
    """The report in miniature: synthetic NIH and SIIM data (SIIM images are NIH images, as
    in the real data sets) -> one dataset split by patient -> `pneumo experiment` with the
    demo recipe, printing Table 1 (under 10 minutes on a 2-core CPU)."""
    import shlex
    import sys

    from experiment.recipe import load_recipe
    from experiment.run import ExperimentConfig
    from ingest.batch import BatchConfig
    from ingest.demo import DEMO_PATIENT_SECRET, write_demo_pair
    from ingest.nih import NihConfig, ingest_nih
    from ingest.siim import SiimConfig, ingest_siim

    root = out.rstrip("/")
    raw = Path("demo-raw") if root.startswith("s3://") else Path(root) / "raw"
    with ProgressBar("demo data", unit="img", total=n_nih + n_siim) as bar:
        pair = write_demo_pair(
            raw, n_nih=n_nih, n_siim=n_siim, seed=seed, size=size, progress=bar.update_to
        )
    typer.echo(
        f"1/3 wrote {pair.nih.n_images} NIH PNGs ({pair.nih.n_positive} with pneumothorax) and "
        f"{pair.siim.n_images} SIIM DICOMs drawn from them ({pair.siim.n_positive} positive), "
        f"linked by {pair.xref}"
    )
    dataset = f"{root}/dataset"

    def batch(**kw: object) -> BatchConfig:
        # An explicit secret: the demo's patient keys (and so its splits) are reproducible.
        return BatchConfig(out=dataset, workers=2, patient_secret=DEMO_PATIENT_SECRET, **kw)

    nih_cfg = NihConfig(
        image_root=str(pair.nih.image_root),
        labels=pair.nih.labels_csv,
        train_val_list=pair.nih.out_dir / "train_val_list.txt",
        test_list=pair.nih.out_dir / "test_list.txt",
        batch=batch(split_fractions=DEMO_FRACTIONS),
    )
    siim_cfg = SiimConfig(
        dicom_root=str(pair.siim.image_root),
        labels=pair.siim.labels_csv,
        nih_xref=pair.xref,
        batch=batch(),
    )
    counts = []
    for name, ingest, cfg in (("nih", ingest_nih, nih_cfg), ("siim", ingest_siim, siim_cfg)):
        with ProgressBar(f"ingest {name}", unit="img") as bar:
            summary = ingest(cfg, progress=bar.update_to)
        splits = ", ".join(f"{k} {v}" for k, v in sorted(summary.splits.items()))
        counts.append(f"{name}: " + ("already in" if summary.already_committed else splits))
    typer.echo(f"2/3 ingested into {dataset}, split by patient ({'; '.join(counts)})")
    typer.echo("3/3 the experiment, demo recipe:")
    cfg = ExperimentConfig(
        dataset=dataset,
        out=f"{root}/experiment",
        recipe=load_recipe("demo"),
        seeds=seeds,
        arms=parse_arms(arms),
        resume=resume,
        command="pneumo " + shlex.join(sys.argv[1:]),
    )
    print_result(run_with_progress(cfg))
