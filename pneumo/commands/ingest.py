"""``pneumo ingest dicom|siim|nih`` and ``pneumo demo-data``: source files into a dataset.

``ingest siim`` is ``ingest dicom`` under its SIIM name: the same options, the same code,
the same rows. Only the warnings differ: ``siim`` says, when no ``--nih-xref`` is given,
that Kaggle SIIM PatientIDs are per-image pseudonyms (so the split is image-level in
effect), which ``dicom`` cannot know of a hospital's files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo.render import ProgressBar, fail_on_errors
from pneumo.shards.errors import ConfigError

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
KeyFile = Annotated[
    Path | None,
    typer.Option(
        help="File holding the secret for the keyed hash of patient ids. Default: "
        "$PNEUMO_PATIENT_KEY, else your own random secret, created once in "
        "$XDG_CONFIG_HOME/pneumo/patient-key (~/.config/pneumo). Every batch of a dataset "
        "needs the same secret.",
        exists=True,
        dir_okay=False,
    ),
]
Relabel = Annotated[
    bool,
    typer.Option(
        "--relabel",
        help="Images already in the dataset whose labels differ in this label file are "
        "stored again with the new labels, which supersede the old (labels_version + 1).",
    ),
]
SplitListsOpt = Annotated[
    tuple[Path, Path] | None,
    typer.Option(
        help="NIH's train_val_list.txt test_list.txt: every patient with an image listed for "
        "test is test, in both datasets; the others are train/val. Give them on a dataset's "
        "first batch: it fixes the split policy.",
        exists=True,
        dir_okay=False,
    ),
]

Part = Annotated[
    str | None,
    typer.Option(
        help="I/N: ingest only part I (0-based) of N of the sorted input listing, as one "
        "batch (--batch NAME makes it NAME-IofN); N processes or pods ingest one archive "
        "together, each file once. I may be 'index': $JOB_COMPLETION_INDEX, the pod's index "
        "in a Kubernetes Indexed Job (infra/k8s/ingest-indexed.yaml).",
    ),
]

PatientAttribute = Annotated[
    str,
    typer.Option(
        help="DICOM attributes that name an image's patient, joined by '+': PatientID, "
        "IssuerOfPatientID+PatientID (the same PatientID under two issuers is two "
        "patients), OtherPatientIDs. Hashed with the patient secret, never stored. An image "
        "with these empty is its own patient. --nih-xref, when it maps the image, wins.",
    ),
]

_NO_XREF = (
    "warning: no --nih-xref: SIIM PatientIDs are per-image pseudonyms, so keyed on them every "
    "SIIM image is its own patient and the splits are image-level (images of one person can "
    "land in train and test). Give --nih-xref siim_to_nih_id.csv for patient-level splits "
    "shared with NIH (see README, Splits)."
)


def _batch_config(
    out: str,
    batch: str | None,
    workers: int,
    shard_size: int,
    fractions: str | None,
    key_file: Path | None,
    relabel: bool,
    part: str | None = None,
) -> Any:
    from pneumo.ingest.batch import BatchConfig
    from pneumo.ingest.patients import resolve_secret

    parsed = None
    if fractions:
        try:
            parsed = tuple(float(x) for x in fractions.split(","))
        except ValueError as e:
            raise ConfigError(f"--split-fractions {fractions!r}: expected three numbers") from e
    parsed_part = _parse_part(part) if part else None
    # Creating the user's secret logs where it is (a warning: shown once, on stderr).
    secret = resolve_secret(key_file)
    return BatchConfig(
        out=out,
        batch=batch,
        workers=workers,
        shard_max_samples=shard_size,
        split_fractions=parsed,
        patient_secret=secret,
        relabel=relabel,
        part=parsed_part,
    )


def _parse_part(part: str) -> tuple[int, int]:
    """``I/N`` -> (I, N); I = ``index`` is $JOB_COMPLETION_INDEX."""
    index, sep, count = part.partition("/")
    if index == "index":
        index = os.environ.get("JOB_COMPLETION_INDEX", "")
        if not index:
            raise ConfigError(
                f"--part {part!r}: JOB_COMPLETION_INDEX is not set (not in an Indexed Job)"
            )
    try:
        if not sep:
            raise ValueError
        return int(index), int(count)
    except ValueError as e:
        raise ConfigError(f"--part {part!r}: expected I/N, e.g. 0/4") from e


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
        f"({splits}), skipped {summary.skipped} already in the dataset, "
        f"{summary.duplicates} given twice, quarantined {summary.quarantined}, "
        f"{summary.shards} shards"
    )
    for line in _notes(summary, out):
        typer.echo("  " + line)
    if summary.quarantined:
        typer.echo(
            f'see why: pneumo manifest {out} --table quarantine --where "batch == '
            f"'{summary.batch}'\""
        )


def _notes(summary: Any, out: str) -> list[str]:
    notes = []
    if summary.resumed_files:
        notes.append(f"resumed: {summary.resumed_files} files were done by an earlier attempt")
    if summary.relabelled:
        notes.append(f"{summary.relabelled} images relabelled (their old labels superseded)")
    if summary.label_changes:
        notes.append(
            f"{summary.label_changes} skipped images have other labels in this file: "
            "--relabel applies them as a new labels version"
        )
    if summary.orphan_labels:
        notes.append(
            f"{summary.orphan_labels} label rows are for images neither in this batch nor "
            "stored (not quarantined: a label file may cover a whole archive)"
        )
    if summary.bases:
        bases = ", ".join(f"{k} {v}" for k, v in sorted(summary.bases.items()))
        notes.append(f"patient basis: {bases}")
    if summary.kept_split:
        shown = ", ".join(
            f"{key} {kept} (policy: {wanted})"
            for key, (kept, wanted) in sorted(summary.kept_split.items())[:5]
        )
        more = len(summary.kept_split) - 5
        notes.append(
            f"{len(summary.kept_split)} patients kept their committed split where this "
            f"batch's policy differs: {shown}" + (f" and {more} more" if more > 0 else "")
        )
    return notes


def _dicom_command(name: str, doc: str) -> Any:
    """``ingest dicom`` and its SIIM-named alias ``ingest siim``: one body, two names (the
    name picks the warnings, and the line an interruption prints)."""

    def command(
        dicom_root: Annotated[str, typer.Argument(help="Folder or s3:// prefix of .dcm files.")],
        out: Dataset,
        labels: Annotated[
            Path | None,
            typer.Option(help="SIIM RLE label CSV (any stage).", exists=True, dir_okay=False),
        ] = None,
        labels_seg: Annotated[
            str | None,
            typer.Option(
                "--labels-seg",
                help="Folder or s3:// prefix of DICOM SEG objects: the masks of the images "
                "they reference by SOPInstanceUID (pneumothorax segments OR-ed; FRACTIONAL "
                "ones at >= 0.5). A SEG that names no image here or in the dataset is "
                "quarantined. Instead of --labels.",
            ),
        ] = None,
        batch: Batch = None,
        workers: Workers = 1,
        nih_xref: Annotated[
            Path | None,
            typer.Option(
                help="CSV mapping SIIM ImageIds to NIH images (Kaggle_ID,NIH_ID, e.g. "
                "siim_to_nih_id.csv): a SIIM image's patient becomes its NIH patient.",
                exists=True,
                dir_okay=False,
            ),
        ] = None,
        patient_attribute: PatientAttribute = "PatientID",
        test_list: Annotated[
            Path | None,
            typer.Option(
                help="File of image ids (SOPInstanceUIDs) whose patients go to the test split.",
                exists=True,
                dir_okay=False,
            ),
        ] = None,
        split_lists: SplitListsOpt = None,
        split_fractions: Fractions = None,
        shard_size: ShardSize = 1000,
        patient_key_file: KeyFile = None,
        relabel: Relabel = False,
        part: Part = None,
    ) -> None:
        from pneumo.ingest.patients import DicomPatientRule
        from pneumo.ingest.siim import SiimConfig, ingest_siim

        rule = DicomPatientRule.parse(patient_attribute)
        if name == "siim" and nih_xref is None:
            typer.echo(_NO_XREF, err=True)
        cfg = SiimConfig(
            dicom_root=dicom_root,
            labels=labels,
            labels_seg=labels_seg,
            nih_xref=nih_xref,
            test_list=test_list,
            split_lists=split_lists,
            patients=rule,
            batch=_batch_config(
                out, batch, workers, shard_size, split_fractions, patient_key_file, relabel, part
            ),
        )
        with ProgressBar(f"ingest {name}", unit="img") as bar:
            summary = ingest_siim(cfg, progress=bar.update_to)
        _report(summary, out)
        siim_xref = name == "siim" and nih_xref is not None
        for line in _patient_warnings(summary, " or ".join(rule.ids), siim_xref=siim_xref):
            typer.echo(line, err=True)

    command.__name__ = f"ingest_{name}_cmd"  # names the command in an interruption's line
    command.__doc__ = doc
    return app.command(name)(fail_on_errors(command))


def _patient_warnings(summary: Any, ids: str, *, siim_xref: bool) -> list[str]:
    """What the patient bases of a DICOM batch's new rows mean for its split (``siim_xref``:
    SIIM files with an xref, whose unmapped images fall back to pseudonymous PatientIDs)."""
    from pneumo.ingest.patients import BASIS_NIH_XREF, IMAGE_LEVEL_SUFFIX

    lines = []
    own = sum(n for b, n in summary.bases.items() if b.endswith(IMAGE_LEVEL_SUFFIX))
    if own:
        lines.append(
            f"warning: {own} images have no {ids}: each is its own patient (patient_basis "
            "dicom-image), so their split is image-level and images of one person can land "
            "in train and test. Name the attribute that holds their patient with "
            "--patient-attribute (see README, Splits)."
        )
    bases = summary.bases.items()
    header = sum(n for b, n in bases if b != BASIS_NIH_XREF and not b.endswith(IMAGE_LEVEL_SUFFIX))
    if siim_xref and header:
        lines.append(
            f"warning: {header} images are not in --nih-xref: keyed on their SIIM PatientID, "
            "a per-image pseudonym, each is its own patient (an image-level split)."
        )
    return lines


ingest_dicom_cmd = _dicom_command(
    "dicom",
    """Ingest a batch of chest DICOMs (+ SIIM RLE labels), split by patient: the NIH patient
    through --nih-xref, else the patient the DICOM header names (--patient-attribute).""",
)
ingest_siim_cmd = _dicom_command(
    "siim",
    """Ingest SIIM-ACR DICOMs (+ RLE labels) as one batch: `ingest dicom` under its SIIM name
    (same options, same rows). Without --nih-xref it warns that SIIM PatientIDs are per-image
    pseudonyms: the split is then image-level in effect.""",
)


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
    split_lists: SplitListsOpt = None,
    batch: Batch = None,
    workers: Workers = 1,
    split_fractions: Fractions = None,
    shard_size: ShardSize = 1000,
    patient_key_file: KeyFile = None,
    relabel: Relabel = False,
    part: Part = None,
) -> None:
    """Ingest NIH ChestX-ray14 PNGs (+ Data_Entry labels) as one batch."""
    from pneumo.ingest.nih import NihConfig, ingest_nih

    train_val, test = split_lists if split_lists else (None, None)
    cfg = NihConfig(
        image_root=image_root,
        labels=labels,
        bbox=bbox,
        train_val_list=train_val,
        test_list=test,
        batch=_batch_config(
            out, batch, workers, shard_size, split_fractions, patient_key_file, relabel, part
        ),
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
    from pneumo.synthetic.archives import write_nih_demo, write_siim_demo

    writers = {"siim": write_siim_demo, "nih": write_nih_demo}
    if kind not in writers:
        raise ConfigError(f"demo-data {kind!r}: expected siim or nih")
    with ProgressBar(f"demo-data {kind}", unit="img", total=n) as bar:
        summary = writers[kind](out_dir, n=n, seed=seed, size=size, progress=bar.update_to)
    typer.echo(
        f"wrote {summary.n_images} images ({summary.n_positive} with pneumothorax) "
        f"under {summary.image_root}; labels: {summary.labels_csv}"
    )
