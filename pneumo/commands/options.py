"""Option types shared by several command modules (one definition each)."""

from __future__ import annotations

from typing import Annotated

import typer

DatasetArg = Annotated[str, typer.Argument(help="Dataset: folder or s3://bucket/prefix.")]
RunArg = Annotated[str, typer.Argument(help="Run: folder or s3://bucket/prefix.")]
Size = Annotated[int, typer.Option(help="Square input side in pixels (multiple of 32).")]
BatchSize = Annotated[int, typer.Option(help="Images per step (per process).", min=1)]
LoaderWorkers = Annotated[int, typer.Option(help="Loader processes per training process.", min=0)]
Checkpoint = Annotated[str, typer.Option(help="best | last | URL of a checkpoint file.")]
