"""A run's rows: selected once at its start, stored in the RUN, checked for leakage.

A run *pins* its data: on a fresh start rank 0 selects ``cfg.where`` and ``cfg.val_where``
once, the task filters them (:meth:`pneumo.training.task.Task.prepare_rows`: labelled rows, a
``label`` column...), ``cfg.train_fraction`` < 1 keeps that share of the training patients
(:func:`pneumo.shards.selections.patient_subset`), and they are stored as
``RUN/rows/train.parquet`` and ``RUN/rows/val.parquet``, their fingerprints
(:func:`pneumo.shards.manifest.fingerprint`) going into every checkpoint. A resumed run reads
them back and checks the fingerprints, so a batch committed to the dataset while a run
trains changes nothing in that run.

The leakage guard runs on a fresh start: no ``patient_key`` of the training rows may be in
the SIIM val/test rows (:data:`pneumo.shards.selections.HELD_OUT`) unless ``allow_overlap``.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from pneumo.shards import manifest
from pneumo.shards.audit import held_out_overlap
from pneumo.shards.errors import ConfigError
from pneumo.shards.selections import HELD_OUT, patient_subset
from pneumo.shards.store import open_store
from pneumo.training.data import select
from pneumo.training.runs import RunDir
from pneumo.training.task import RunConfig, Task

log = logging.getLogger(__name__)

TRAIN_ROWS, VAL_ROWS = "rows/train.parquet", "rows/val.parquet"


def pin_rows(
    task: Task, run_dir: RunDir, ckpt: dict[str, Any] | None
) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Rank 0: the run's rows (selected now and stored, or read back) and their record."""
    cfg = task.cfg
    if ckpt is not None:
        if not (run_dir.exists(TRAIN_ROWS) and run_dir.exists(VAL_ROWS)):
            raise ConfigError(f"cannot resume {run_dir.url}: its pinned rows/ are missing")
        train, val = run_dir.get_table(TRAIN_ROWS), run_dir.get_table(VAL_ROWS)
        found = {"train": manifest.fingerprint(train), "val": manifest.fingerprint(val)}
        want = ckpt["fingerprints"]
        if any(found[k] != want.get(k) for k in found):
            raise ConfigError(
                f"cannot resume {run_dir.url}: its rows/ do not match its checkpoint "
                f"(fingerprints {found}, checkpoint {want})"
            )
        return train, val, {"fingerprints": want, "leakage": ckpt["leakage"]}
    train = task.prepare_rows(_select(cfg.dataset, cfg.where, "--where"), train=True)
    train = _fraction_of(train, cfg.train_fraction)
    val = task.prepare_rows(_select(cfg.dataset, cfg.val_where, "--val-where"), train=False)
    for rows, option, where in ((train, "--where", cfg.where), (val, "--val-where", cfg.val_where)):
        if rows.num_rows == 0:
            raise ConfigError(f"{option} {where!r} selects no usable rows in {cfg.dataset}")
    leakage = leakage_check(cfg, train)
    run_dir.put_table(TRAIN_ROWS, train)
    run_dir.put_table(VAL_ROWS, val)
    fingerprints = {
        "train": manifest.fingerprint(train),
        "val": manifest.fingerprint(val),
        **task.fingerprints(),
    }
    return train, val, {"fingerprints": fingerprints, "leakage": leakage}


def _fraction_of(train: pa.Table, fraction: float) -> pa.Table:
    """``fraction`` of the training patients (all of them at 1)."""
    if fraction == 1:
        return train
    kept = patient_subset(train, fraction)
    log.info(
        "train_fraction %g: %d of %d training patients, %d of %d rows",
        fraction,
        len(set(kept.column("patient_key").to_pylist())),
        len(set(train.column("patient_key").to_pylist())),
        kept.num_rows,
        train.num_rows,
    )
    return kept


def _select(dataset: str, where: str, option: str) -> pa.Table:
    rows = select(dataset, where)
    if rows.num_rows == 0:
        raise ConfigError(f"{option} {where!r} selects no rows in {dataset}")
    return rows


def leakage_check(cfg: RunConfig, train: pa.Table) -> dict[str, Any]:
    """Refuse training patients that are in the SIIM val/test rows; what was found.

    Returns:
        ``held_out_where``, ``held_out_patients``, ``overlap_patients`` (training patients
        among them), ``allow_overlap``, and ``nih_patients_excluded``: the NIH patients who
        are SIIM val/test patients, whom the unified split keeps out of NIH's train split.

    Raises:
        ConfigError: an overlap without ``cfg.allow_overlap``.
    """
    store = open_store(cfg.dataset, create=False)
    held = manifest.read(store, HELD_OUT, columns=["patient_key"])
    nih = manifest.read(store, "dataset == 'nih'", columns=["patient_key"])
    held_patients = set(held.column("patient_key").to_pylist()) - {None}
    overlap = held_out_overlap(train, held)
    info = {
        "held_out_where": HELD_OUT,
        "held_out_patients": len(held_patients),
        "nih_patients_excluded": len(set(nih.column("patient_key").to_pylist()) & held_patients),
        "overlap_patients": len(overlap),
        "allow_overlap": cfg.allow_overlap,
    }
    if overlap and not cfg.allow_overlap:
        raise ConfigError(
            f"{len(overlap)} patient(s) of the training rows (--where {cfg.where!r}) are also "
            f"in the SIIM val/test rows ({HELD_OUT}), so their SIIM scores would leak: "
            "select only the train split of a dataset whose SIIM rows were ingested with "
            "--nih-xref (one split per patient), or pass --allow-overlap to train anyway"
        )
    if overlap:
        log.warning(
            "--allow-overlap: %d training patients are SIIM val/test patients", len(overlap)
        )
    return info
