"""``pneumo bench ...``: throughput measurements."""

from __future__ import annotations

from typing import Annotated

import typer

from pneumo.commands.options import BatchSize, DatasetArg, LoaderWorkers, Size
from pneumo.render import ProgressBar, fail_on_errors

app = typer.Typer(help="Measure throughput.", no_args_is_help=True)


@app.command("loader")
@fail_on_errors
def bench_loader_cmd(
    dataset: DatasetArg,
    size: Size = 512,
    workers: LoaderWorkers = 2,
    batch_size: BatchSize = 8,
    seconds: Annotated[float, typer.Option(help="How long to measure.", min=0.5)] = 20.0,
    where: Annotated[str | None, typer.Option(help="Rows to stream (manifest filter).")] = None,
) -> None:
    """Samples/s of the training stream: read + decode + resize + augment (last line)."""
    from pneumo.training.data import LoaderConfig, bench_loader

    cfg = LoaderConfig(
        dataset=dataset, where=where, size=size, batch_size=batch_size, workers=workers
    )
    with ProgressBar("bench loader", unit="s") as bar:
        rate = bench_loader(
            cfg, seconds, progress=lambda done, total: bar.update_to(int(done), int(total))
        )
    typer.echo(f"samples/s: {rate:.1f}")
