"""``pneumo manifest``: query a dataset's manifest or quarantine table."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo.render import fail_on_errors, print_table
from pneumo.shards.errors import ConfigError


@fail_on_errors
def manifest_cmd(
    dataset: Annotated[str, typer.Argument(help="Dataset: folder or s3://bucket/prefix.")],
    where: Annotated[
        str | None, typer.Option(help="Filter, e.g. \"split == 'train' and has_ptx\"; see README.")
    ] = None,
    columns: Annotated[str | None, typer.Option(help="Comma-separated columns.")] = None,
    table: Annotated[str, typer.Option(help="samples | quarantine")] = "samples",
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json | parquet")] = "table",
    output: Annotated[
        Path | None,
        typer.Option(help="Write to this file (parquet needs one unless stdout is a pipe)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many rows.")] = None,
) -> None:
    """Query a dataset's manifest (or its quarantine table)."""
    from pneumo.shards.manifest import read
    from pneumo.shards.store import open_store

    if table not in ("samples", "quarantine"):
        raise ConfigError(f"--table {table!r}: expected samples or quarantine")
    if fmt not in ("table", "csv", "json", "parquet"):
        raise ConfigError(f"--format {fmt!r}: expected table, csv, json or parquet")
    cols = [c.strip() for c in columns.split(",")] if columns else None
    result = read(open_store(dataset, create=False), where=where, columns=cols, table=table)  # type: ignore[arg-type]
    if limit is not None:
        result = result.slice(0, limit)
    _write_table(result, fmt, output)


def _write_table(result: Any, fmt: str, output: Path | None) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        if output is None and sys.stdout.isatty():
            raise ConfigError("--format parquet writes binary: give --output FILE or a pipe")
        pq.write_table(result, output or sys.stdout.buffer)
        return
    out = open(output, "w") if output else sys.stdout  # noqa: SIM115
    try:
        if fmt == "csv":
            buf = io.BytesIO()
            pacsv.write_csv(_flatten_lists(result), buf)
            out.write(buf.getvalue().decode())
        elif fmt == "json":
            for row in result.to_pylist():
                out.write(json.dumps(row, default=str) + "\n")
        else:
            print_table(result, out)
    finally:
        if output:
            out.close()


def _flatten_lists(table: Any) -> Any:
    """CSV has no list type: list columns (NIH findings) become ``A|B`` strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for i, f in enumerate(table.schema):
        if pa.types.is_list(f.type):
            table = table.set_column(i, f.name, pc.binary_join(table.column(i), "|"))
    return table
