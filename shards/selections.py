"""The default selections: the manifest filters every task, command and recipe starts from.

Each is a ``--where`` expression (:mod:`pneumo.shards.query`), written here once and
imported wherever a default is needed, so "SIIM train" means the same rows in ``pneumo train
segment``, ``pneumo evaluate segment``, the loader and the experiment's recipes.

SIIM selections are the *labelled* images of a split (segmentation needs a mask, and the
SIIM metric a truth); NIH selections take every image of a split, since classification
tasks filter their own labels and autoencoders need none.

:func:`patient_subset` narrows selected rows to a fraction of their patients (a label-
fraction sweep): whole patients, in one fixed order of patient keys, so the patients of a
smaller fraction are always among those of a larger one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa

from pneumo.shards.errors import ConfigError

# Salt of the patient order (bump to draw other subsets; every fraction's runs then change).
PATIENT_ORDER = "pneumo.patient-order/1"


def siim(split: str) -> str:
    """The labelled SIIM images of ``split``: what segmentation trains and is scored on."""
    return f"dataset == 'siim' and split == {split!r} and has_ptx is not None"


def nih(split: str) -> str:
    """Every NIH image of ``split``: what pretraining reads."""
    return f"dataset == 'nih' and split == {split!r}"


def every(split: str) -> str:
    """Every image of ``split``, of any dataset."""
    return f"split == {split!r}"


SIIM_TRAIN = siim("train")
SIIM_VAL = siim("val")
SIIM_TEST = siim("test")
NIH_TRAIN = nih("train")
NIH_VAL = nih("val")
NIH_TEST = nih("test")
TRAIN = every("train")
VAL = every("val")
# The rows a pretraining or training selection must never share a patient with.
HELD_OUT = "dataset == 'siim' and split in ['val', 'test']"


def patient_order(patients: Iterable[str]) -> list[str]:
    """Distinct patients ranked by the SHA-256 of their key (salted with
    :data:`PATIENT_ORDER`): an order that depends on the keys alone, on no seed and on no
    other row, and that mixes patients whatever their keys' own order."""
    rank = {p: hashlib.sha256(f"{PATIENT_ORDER}:{p}".encode()).hexdigest() for p in patients}
    return sorted(rank, key=lambda p: (rank[p], p))


def check_fraction(fraction: float) -> None:
    """Refuse a patient fraction outside (0, 1]."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"a patient fraction must be in (0, 1], got {fraction}")


def patients_kept(patients: int, fraction: float) -> int:
    """How many of ``patients`` a ``fraction`` keeps: rounded half up, at least one."""
    check_fraction(fraction)
    return min(patients, max(1, int(fraction * patients + 0.5)))


def patient_subset(rows: pa.Table, fraction: float) -> pa.Table:
    """The rows of a ``fraction`` of the patients of ``rows`` (all their images, or none).

    Patients are taken in :func:`patient_order`, except that the first patient with a
    positive image (``has_ptx``) in that order comes first, so any fraction keeps at least
    one patient and, when ``rows`` hold a positive, one positive patient. The order does
    not depend on ``fraction``: the subsets of one set of rows nest. A row without a
    ``patient_key`` is a patient of its own (its sample ``key``). ``fraction`` 1 returns
    ``rows`` unchanged.

    Raises:
        ConfigError: ``fraction`` is not in (0, 1].
    """
    check_fraction(fraction)
    if fraction == 1 or rows.num_rows == 0:
        return rows
    ids = [
        p if p is not None else f"image:{k}"
        for p, k in zip(
            rows.column("patient_key").to_pylist(), rows.column("key").to_pylist(), strict=True
        )
    ]
    order = patient_order(ids)
    if "has_ptx" in rows.column_names:
        positive = {p for p, y in zip(ids, rows.column("has_ptx").to_pylist(), strict=True) if y}
        first = next((p for p in order if p in positive), None)
        if first is not None:
            order.remove(first)
            order.insert(0, first)
    kept = patients_kept(len(order), fraction)
    chosen = set(order[:kept])
    return rows.filter(pa.array([p in chosen for p in ids], pa.bool_()))
