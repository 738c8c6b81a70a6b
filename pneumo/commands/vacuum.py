"""``pneumo vacuum``: remove shards and table files no reader can reach, once old enough."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pneumo.commands.options import DatasetArg
from pneumo.render import fail_on_errors
from pneumo.shards.errors import ConfigError


@fail_on_errors
def vacuum_cmd(
    dataset: DatasetArg,
    retention_hours: Annotated[
        float,
        typer.Option(
            help="Keep anything younger than this: readers of earlier table versions and "
            "ingests under way keep working.",
            min=0,
        ),
    ] = 168.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, delete nothing.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Remove shards no committed row names (left by killed or superseded ingest attempts)
    and manifest files no table version within the retention uses. Ingest never deletes a
    shard itself; batches being written or resumable are kept whatever their age."""
    from pneumo.shards.store import open_store
    from pneumo.shards.vacuum import vacuum

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: expected table or json")
    summary = vacuum(
        open_store(dataset, create=False), retention_hours=retention_hours, dry_run=dry_run
    )
    if fmt == "json":
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for path in summary.shards:
        typer.echo(f"{verb} {path}")
    typer.echo(
        f"{verb} {len(summary.shards)} unreferenced shards and {summary.table_files} table "
        f"files; kept {summary.too_young} unreferenced shards younger than "
        f"{retention_hours:g} h and {summary.in_progress} of batches in progress"
    )
