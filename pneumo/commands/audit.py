"""``pneumo audit``: is any patient in two splits, within a dataset or across datasets?"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from pneumo.render import fail_on_errors
from pneumo.shards.errors import ConfigError


@fail_on_errors
def audit_cmd(
    datasets: Annotated[
        list[str], typer.Argument(help="One or more datasets: folders or s3://bucket/prefix.")
    ],
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Images and patients per dataset and split, and per patient basis (how patients were
    found); every patient found in more than one split (within a dataset or across the
    datasets given), counted by pair; images whose patient basis is image-level. Exit code 0
    when no patient is in two splits, else 1."""
    from pneumo.shards.audit import audit_datasets
    from pneumo.shards.store import open_store

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: expected table or json")
    report = audit_datasets([(name, open_store(name, create=False)) for name in datasets])
    if fmt == "json":
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print(report)
    raise typer.Exit(0 if report.ok else 1)


def _print(report: Any) -> None:
    import pyarrow as pa

    from pneumo.render import print_table

    rows = [vars(g) for g in report.groups]
    print_table(pa.Table.from_pylist(rows), sys.stdout)
    if report.bases:
        typer.echo("")
        print_table(pa.Table.from_pylist([vars(b) for b in report.bases]), sys.stdout)
        for b in report.bases:
            if b.one_image_per_patient:
                typer.echo(
                    f"{b.dataset} {b.basis}: one image per patient ({b.images} images): if "
                    "its ids are made per image (Kaggle SIIM PatientIDs are), its split is "
                    "image-level in effect: ingest SIIM with --nih-xref (see README, Splits)"
                )
    typer.echo(f"patients in more than one split: {report.overlapping_patients}")
    for (a, b), n in sorted(report.pairs.items()):
        typer.echo(f"  {a} and {b}: {n} patients")
    if report.overlapping_patients:
        typer.echo(
            "a model trained on one of these splits and scored on the other sees the same "
            "people: re-ingest the datasets with one split policy (see README, Splits)"
        )
    if report.image_level_images:
        typer.echo(
            f"{report.image_level_images} images have an image-level patient basis (each "
            "image is its own patient: DICOMs without a PatientID, or SIIM ingested without "
            "--nih-xref by an older pneumo), so patients with several images may still be in "
            "two splits unseen"
        )
