"""``pneumo batch list|drop``: the batches of a dataset, and undoing one."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from pneumo.commands.options import DatasetArg
from pneumo.render import fail_on_errors
from pneumo.shards.errors import ConfigError

app = typer.Typer(help="List the batches of a dataset, or drop one.", no_args_is_help=True)


@app.command("list")
@fail_on_errors
def list_cmd(
    dataset: DatasetArg,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Every batch: committed, interrupted (rerun its ingest command, or drop it) or being
    dropped; its images, quarantined inputs and shards."""
    import pyarrow as pa

    from pneumo.render import print_table
    from pneumo.shards.batches import list_batches
    from pneumo.shards.store import open_store

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: expected table or json")
    batches = list_batches(open_store(dataset, create=False))
    if fmt == "json":
        typer.echo(json.dumps([b.to_dict() for b in batches], indent=2))
        return
    rows = [b.to_dict() for b in batches]
    columns = ["dataset", "batch", "state", "images", "quarantined", "shards", "relabel"]
    table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in columns})
    print_table(table.select(columns), sys.stdout)


@app.command("drop")
@fail_on_errors
def drop_cmd(
    dataset: DatasetArg,
    batch: Annotated[str, typer.Argument(help="BATCH, or DATASET/BATCH (e.g. siim/b1).")],
) -> None:
    """Drop a batch: its manifest and quarantine rows disappear in one step, then its shards
    are deleted. Interrupted, it finishes when run again. Its images can be ingested again."""
    from pneumo.shards.batches import drop_batch, find_batch
    from pneumo.shards.store import open_store

    store = open_store(dataset, create=False)
    name, found = find_batch(store, batch)
    summary = drop_batch(store, name, found)
    typer.echo(
        f"dropped batch {name}/{found} ({summary.was}): {summary.images} images, "
        f"{summary.shards} shards deleted"
    )
