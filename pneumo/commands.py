"""The commands that run whole jobs: ``demo`` (and, as they land, ``train``, ``evaluate``,
``predict``, ``bench``). Registered on the app by importing this module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumo.cli import app
from pneumo.render import ProgressBar, fail_on_errors, print_table


@app.command("demo")
@fail_on_errors
def demo_cmd(
    out: Annotated[str, typer.Option(help="Where the demo writes: folder or s3://bucket/prefix.")]
    = "demo",
    n: Annotated[int, typer.Option(help="Synthetic SIIM images.", min=8)] = 96,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """The main job on the embedded default: synthetic SIIM batch -> ingest -> manifest query."""
    import sys

    from ingest.batch import BatchConfig
    from ingest.demo import write_siim_demo
    from ingest.siim import SiimConfig, ingest_siim
    from shards.manifest import read
    from shards.store import open_store

    raw = Path(out) / "raw" if not out.startswith("s3://") else Path("demo-raw")
    dataset = f"{out.rstrip('/')}/dataset"
    with ProgressBar("demo-data siim", unit="img", total=n) as bar:
        demo = write_siim_demo(raw, n=n, seed=seed, progress=bar.update_to)
    typer.echo(f"1/2 wrote {demo.n_images} synthetic SIIM DICOMs ({demo.n_positive} positive)")
    cfg = SiimConfig(dicom_root=str(demo.image_root), labels=demo.labels_csv,
                     batch=BatchConfig(out=dataset, workers=2))
    with ProgressBar("ingest siim", unit="img") as bar:
        summary = ingest_siim(cfg, progress=bar.update_to)
    typer.echo(f"2/2 batch {summary.batch}: ingested {summary.ingested}, skipped "
               f"{summary.skipped}, quarantined {summary.quarantined} -> {dataset}")
    table = read(open_store(dataset)).group_by(["split", "has_ptx"]).aggregate(
        [("key", "count")]).sort_by([("split", "ascending"), ("has_ptx", "ascending")])
    print_table(table, sys.stdout)
