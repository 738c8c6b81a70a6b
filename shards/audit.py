"""Patient leakage checks: is any patient in two splits, or in training and in a held-out set?

SIIM images are NIH ChestX-ray14 images, so SIIM and NIH rows of one person share a
``patient_key`` once the SIIM rows were ingested with the SIIM->NIH cross-reference. A
patient in two splits (within one dataset or across datasets keyed with the same secret)
means a model can be scored on a person it was trained on.

Two entry points:

- :func:`audit`: every (dataset, split) with its images and patients, every (dataset,
  patient basis) with its images and patients (how the patients were found: an NIH id, a
  DICOM PatientID, the image itself...), and every patient found in more than one split,
  counted by (dataset, split) pair; :func:`audit_datasets` reads it from one or more
  DATASETs. ``pneumo audit`` prints it.
- :func:`held_out_overlap`: the patients of a training selection that are also in the
  held-out rows (by default the SIIM val/test rows). Training commands refuse to start when
  it is not empty.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pneumo.shards import manifest
from pneumo.shards.errors import ManifestError
from pneumo.shards.store import Store

# A patient basis ending in this is image-level: the image is its own patient.
IMAGE_LEVEL_SUFFIX = "-image"
AUDIT_COLUMNS = ["dataset", "split", "patient_key", "patient_basis"]


@dataclass(frozen=True, kw_only=True)
class SplitCount:
    dataset: str
    split: str
    images: int
    patients: int
    image_level: int = 0  # images whose patient basis is image-level


@dataclass(frozen=True, kw_only=True)
class BasisCount:
    """The images of one dataset whose patients were found one way (``patient_basis``)."""

    dataset: str
    basis: str  # "" for rows written without one
    images: int
    patients: int
    image_level: bool  # the basis is the image itself: as many patients as images

    @property
    def one_image_per_patient(self) -> bool:
        """Every patient of a patient-level basis has one image: true of a dataset with one
        image per person, and of pseudonyms made per image (Kaggle SIIM PatientIDs)."""
        return not self.image_level and self.images > 1 and self.images == self.patients


@dataclass(frozen=True, kw_only=True)
class AuditReport:
    """What :func:`audit` found. ``ok`` when no patient is in two (dataset, split) groups
    with different splits."""

    groups: list[SplitCount]
    overlapping_patients: int  # patients found in more than one split
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)  # "ds/split" pairs
    image_level_images: int = 0  # rows whose patient basis is the image itself
    bases: list[BasisCount] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)  # the DATASETs audited, when given

    @property
    def ok(self) -> bool:
        return self.overlapping_patients == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "datasets": self.datasets,
            "groups": [vars(g) for g in self.groups],
            "overlapping_patients": self.overlapping_patients,
            "pairs": [{"a": a, "b": b, "patients": n} for (a, b), n in sorted(self.pairs.items())],
            "image_level_images": self.image_level_images,
            "bases": [
                {**vars(b), "one_image_per_patient": b.one_image_per_patient} for b in self.bases
            ],
        }


def audit(rows: pa.Table) -> AuditReport:
    """Images and patients per (dataset, split) and per (dataset, patient basis), and
    patients found in more than one split.

    ``rows`` needs ``dataset``, ``split`` and ``patient_key`` (``patient_basis`` is used
    when present: rows whose basis ends in ``-image`` count as image-level).
    """
    datasets = rows.column("dataset").to_pylist()
    splits = rows.column("split").to_pylist()
    patients = rows.column("patient_key").to_pylist()
    if "patient_basis" in rows.column_names:
        basis = pc.fill_null(rows.column("patient_basis"), "")
        image_level = pc.ends_with(basis, IMAGE_LEVEL_SUFFIX).to_pylist()
        bases = basis.to_pylist()
    else:
        image_level = [False] * rows.num_rows
        bases = [""] * rows.num_rows
    groups_of: dict[str, set[tuple[str, str]]] = {}  # patient -> {(ds, split), ...}
    images: Counter[tuple[str, str]] = Counter()
    flagged: Counter[tuple[str, str]] = Counter()
    members: dict[tuple[str, str], set[str]] = {}
    for ds_name, split, patient, own in zip(datasets, splits, patients, image_level, strict=True):
        group = (ds_name, split)
        images[group] += 1
        flagged[group] += bool(own)
        if patient is None:  # no key at all: counted as an image, never matched
            continue
        members.setdefault(group, set()).add(patient)
        groups_of.setdefault(patient, set()).add(group)
    pairs: Counter[tuple[str, str]] = Counter()
    overlapping = 0
    for groups in groups_of.values():
        if len({split for _, split in groups}) < 2:
            continue  # one split, possibly in two datasets: that is how it should be
        overlapping += 1
        for a, b in combinations(sorted(groups), 2):
            if a[1] != b[1]:
                pairs[(f"{a[0]}/{a[1]}", f"{b[0]}/{b[1]}")] += 1
    counts = [
        SplitCount(
            dataset=d,
            split=s,
            images=images[(d, s)],
            patients=len(members.get((d, s), ())),
            image_level=flagged[(d, s)],
        )
        for d, s in sorted(images)
    ]
    return AuditReport(
        groups=counts,
        overlapping_patients=overlapping,
        pairs=dict(pairs),
        image_level_images=sum(flagged.values()),
        bases=_basis_counts(datasets, bases, patients),
    )


def _basis_counts(
    datasets: Sequence[str], bases: Sequence[str], patients: Sequence[str | None]
) -> list[BasisCount]:
    """Images and distinct patient keys per (dataset, patient basis)."""
    images: Counter[tuple[str, str]] = Counter()
    keys: dict[tuple[str, str], set[str]] = {}
    for ds_name, basis, patient in zip(datasets, bases, patients, strict=True):
        images[(ds_name, basis)] += 1
        if patient is not None:
            keys.setdefault((ds_name, basis), set()).add(patient)
    return [
        BasisCount(
            dataset=d,
            basis=b,
            images=n,
            patients=len(keys.get((d, b), ())),
            image_level=b.endswith(IMAGE_LEVEL_SUFFIX),
        )
        for (d, b), n in sorted(images.items())
    ]


def audit_datasets(stores: Sequence[tuple[str, Store]]) -> AuditReport:
    """:func:`audit` over the committed rows of one or more DATASETs (name, store).

    With several, each row's dataset is shown as ``NAME:dataset``, and patients are
    matched across them: they must have been keyed with the same secret.

    Raises:
        ManifestError: the DATASETs were keyed with different secrets (their patients
            cannot be matched), or one has no manifest.
    """
    checks = {name: _secret_check(store) for name, store in stores}
    if len(set(checks.values()) - {None}) > 1:
        raise ManifestError(
            "these datasets were keyed with different patient secrets, so their patients "
            f"cannot be matched (check values: {checks}); audit them one at a time"
        )
    tables = []
    for name, store in stores:
        if manifest.open_dataset(store) is None:
            raise ManifestError(f"{name} has no committed batch: is it a dataset?")
        table = manifest.read(store, columns=AUDIT_COLUMNS)
        if len(stores) > 1:
            labels = pc.binary_join_element_wise(name, table.column("dataset"), ":")
            table = table.set_column(0, "dataset", labels)
        tables.append(table)
    return replace(audit(pa.concat_tables(tables)), datasets=[name for name, _ in stores])


def _secret_check(store: Store) -> str | None:
    settings = manifest.read_settings(store) or {}
    return (settings.get("split_policy") or {}).get("secret_check")


def held_out_overlap(train_rows: pa.Table, held_rows: pa.Table) -> set[str]:
    """The patient keys present in both a training selection and the held-out rows."""
    train = set(train_rows.column("patient_key").to_pylist())
    held = set(held_rows.column("patient_key").to_pylist())
    return (train & held) - {None}
