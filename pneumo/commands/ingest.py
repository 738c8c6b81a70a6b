"""``pneumo ingest siim|nih`` and ``pneumo demo-data``: source files into a dataset."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo.render import ProgressBar, fail_on_errors
from shards.errors import ConfigError

app = typer.Typer(help="Ingest a batch of images and labels into a dataset.", no_args_is_help=True)

Dataset = Annotated[str, typer.Option("--out", help="Dataset: a folder or s3://bucket/prefix.")]
Workers = Annotated[int, typer.Option(help="Decoding processes.", min=1)]
Batch = Annotated[
    str | None,
    typer.Option(
        help="Batch name (letters, digits, _ -). Default: derived from the inputs, "
        "so re-running the same command resumes the same batch."
    ),
]
ShardSize = Annotated[
    int,
    typer.Option(
        help="Samples per tar shard: a shard is closed once it holds this many (it may hold up "
        "to 127 more: work is split in runs of 128 files that never straddle two shards).",
        min=1,
    ),
]
Fractions = Annotated[
    str | None,
    typer.Option(
        help="train,val,test fractions for patient-level splits, e.g. 0.8,0.1,0.1. "
        "Fixed by the dataset's first batch."
    ),
]
Secret = Annotated[
    str | None,
    typer.Option(
        envvar="PNEUMO_PATIENT_KEY",
        show_default=False,
        show_envvar=True,
        help="Secret for the keyed hash of patient ids (keep it apart from the data).",
    ),
]


def _batch_config(
    out: str,
    batch: str | None,
    workers: int,
    shard_size: int,
    fractions: str | None,
    secret: str | None,
) -> Any:
    from ingest.batch import DEFAULT_PATIENT_SECRET, BatchConfig

    if secret is None:
        logging.getLogger("pneumo").warning(
            "PNEUMO_PATIENT_KEY is not set: patient keys use the public default secret"
        )
    parsed = None
    if fractions:
        try:
            parsed = tuple(float(x) for x in fractions.split(","))
        except ValueError as e:
            raise ConfigError(f"--split-fractions {fractions!r}: expected three numbers") from e
    return BatchConfig(
        out=out,
        batch=batch,
        workers=workers,
        shard_max_samples=shard_size,
        split_fractions=parsed,
        patient_secret=secret or DEFAULT_PATIENT_SECRET,
    )


def _report(summary: Any, out: str) -> None:
    if summary.already_committed:
        typer.echo(
            f"batch {summary.batch} is already committed: nothing added "
            f"({summary.skipped} files skipped)"
        )
        return
    splits = ", ".join(f"{k} {v}" for k, v in sorted(summary.splits.items())) or "none"
    typer.echo(
        f"batch {summary.batch} committed: ingested {summary.ingested} "
        f"({splits}), skipped {summary.skipped}, quarantined {summary.quarantined}, "
        f"{summary.shards} shards"
    )
    if summary.orphan_labels:
        typer.echo(
            f"  of the quarantined, {summary.orphan_labels} are label rows whose image "
            "is not in this batch"
        )
    if summary.quarantined:
        typer.echo(
            f'see why: pneumo manifest {out} --table quarantine --where "batch == '
            f"'{summary.batch}'\""
        )


@app.command("siim")
@fail_on_errors
def ingest_siim_cmd(
    dicom_root: Annotated[str, typer.Argument(help="Folder or s3:// prefix of .dcm files.")],
    out: Dataset,
    labels: Annotated[
        Path | None,
        typer.Option(help="SIIM RLE label CSV (any stage).", exists=True, dir_okay=False),
    ] = None,
    batch: Batch = None,
    workers: Workers = 1,
    nih_xref: Annotated[
        Path | None,
        typer.Option(
            help="CSV mapping SIIM ImageIds to NIH images (Kaggle_ID,NIH_ID): patient_key becomes "
            "the NIH patient.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    test_list: Annotated[
        Path | None,
        typer.Option(
            help="File of ImageIds to put in the test split.", exists=True, dir_okay=False
        ),
    ] = None,
    split_fractions: Fractions = None,
    shard_size: ShardSize = 1000,
    patient_key_secret: Secret = None,
) -> None:
    """Ingest SIIM-ACR DICOMs (+ RLE labels) as one batch."""
    from ingest.siim import SiimConfig, ingest_siim

    cfg = SiimConfig(
        dicom_root=dicom_root,
        labels=labels,
        nih_xref=nih_xref,
        test_list=test_list,
        batch=_batch_config(out, batch, workers, shard_size, split_fractions, patient_key_secret),
    )
    with ProgressBar("ingest siim", unit="img") as bar:
        summary = ingest_siim(cfg, progress=bar.update_to)
    _report(summary, out)


@app.command("nih")
@fail_on_errors
def ingest_nih_cmd(
    image_root: Annotated[str, typer.Argument(help="Folder or s3:// prefix of .png files.")],
    labels: Annotated[
        Path, typer.Option(help="Data_Entry_2017.csv (2017 or v2020).", exists=True, dir_okay=False)
    ],
    out: Dataset,
    bbox: Annotated[
        Path | None, typer.Option(help="BBox_List_2017.csv.", exists=True, dir_okay=False)
    ] = None,
    split_lists: Annotated[
        tuple[Path, Path] | None,
        typer.Option(
            help="train_val_list.txt test_list.txt (official patient-wise split).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    batch: Batch = None,
    workers: Workers = 1,
    split_fractions: Fractions = None,
    shard_size: ShardSize = 1000,
    patient_key_secret: Secret = None,
) -> None:
    """Ingest NIH ChestX-ray14 PNGs (+ Data_Entry labels) as one batch."""
    from ingest.nih import NihConfig, ingest_nih

    train_val, test = split_lists if split_lists else (None, None)
    cfg = NihConfig(
        image_root=image_root,
        labels=labels,
        bbox=bbox,
        train_val_list=train_val,
        test_list=test,
        batch=_batch_config(out, batch, workers, shard_size, split_fractions, patient_key_secret),
    )
    with ProgressBar("ingest nih", unit="img") as bar:
        summary = ingest_nih(cfg, progress=bar.update_to)
    _report(summary, out)


@fail_on_errors
def demo_data_cmd(
    kind: Annotated[str, typer.Argument(help="siim | nih")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write into.")],
    n: Annotated[int, typer.Option(help="Number of images.", min=1)] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.", min=32)] = 1024,
) -> None:
    """Write a synthetic batch in the exact on-disk formats (SIIM DICOM+CSV, NIH PNG+CSV)."""
    from ingest.demo import write_nih_demo, write_siim_demo

    writers = {"siim": write_siim_demo, "nih": write_nih_demo}
    if kind not in writers:
        raise ConfigError(f"demo-data {kind!r}: expected siim or nih")
    with ProgressBar(f"demo-data {kind}", unit="img", total=n) as bar:
        summary = writers[kind](out_dir, n=n, seed=seed, size=size, progress=bar.update_to)
    typer.echo(
        f"wrote {summary.n_images} images ({summary.n_positive} with pneumothorax) "
        f"under {summary.image_root}; labels: {summary.labels_csv}"
    )
