"""``pneumo verify``: does every manifest row's sample lie, whole, in its shard?"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pneumo.commands.options import DatasetArg
from pneumo.render import ProgressBar, fail_on_errors
from pneumo.shards.errors import ConfigError


@fail_on_errors
def verify_cmd(
    dataset: DatasetArg,
    deep: Annotated[
        bool, typer.Option("--deep", help="Also hash every image against content_sha256.")
    ] = False,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Check every manifest row against its shard: the shard exists, the sample lies within
    it at its offset and size, the tar headers there name members of its key, its image
    member is there (--deep: and hashes to content_sha256). Prints one line per problem
    (shard, key, reason; json: a list of objects). Exit code 0 when there is none, else 1."""
    from pneumo.shards.store import open_store
    from pneumo.shards.verify import verify

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: expected table or json")
    store = open_store(dataset, create=False)
    with ProgressBar("verify", unit="sample") as bar:
        report = verify(store, deep=deep, progress=bar.update_to)
    checked = f"{report.samples} samples in {report.shards} shards" + (" (deep)" if deep else "")
    if fmt == "json":
        typer.echo(json.dumps(report.to_list(), indent=2))
    else:
        for p in report.problems:
            typer.echo(f"{p.shard}  {p.key}  {p.reason}")
    if report.ok:
        typer.echo(f"verified {checked}: no problems", err=True)
        raise typer.Exit(0)
    typer.echo(
        f"verified {checked}: {len(report.problems)} problems; drop the damaged batches "
        "(`pneumo batch drop`, the batch is in the shard's path) and ingest them again",
        err=True,
    )
    raise typer.Exit(1)
