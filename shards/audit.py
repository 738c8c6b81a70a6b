"""Patient leakage checks: is any patient in two splits, or in training and in a held-out set?

SIIM images are NIH ChestX-ray14 images, so SIIM and NIH rows of one person share a
``patient_key`` once the SIIM rows were ingested with the SIIM->NIH cross-reference. A
patient in two splits (within one dataset or across datasets keyed with the same secret)
means a model can be scored on a person it was trained on.

Two entry points:

- :func:`audit`: every (dataset, split) with its images and patients, and every patient
  found in more than one split, counted by (dataset, split) pair. ``pneumo audit`` prints it.
- :func:`held_out_overlap`: the patients of a training selection that are also in the
  held-out rows (by default the SIIM val/test rows). Training commands refuse to start when
  it is not empty.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

# The rows a pretraining or training selection must never share a patient with.
HELD_OUT_WHERE = "dataset == 'siim' and split in ['val', 'test']"


@dataclass(frozen=True, kw_only=True)
class SplitCount:
    dataset: str
    split: str
    images: int
    patients: int


@dataclass(frozen=True, kw_only=True)
class AuditReport:
    """What :func:`audit` found. ``ok`` when no patient is in two (dataset, split) groups
    with different splits."""

    groups: list[SplitCount]
    overlapping_patients: int  # patients found in more than one split
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)  # "ds/split" pairs
    image_level_images: int = 0  # rows whose patient basis is the image itself

    @property
    def ok(self) -> bool:
        return self.overlapping_patients == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "groups": [vars(g) for g in self.groups],
            "overlapping_patients": self.overlapping_patients,
            "pairs": [{"a": a, "b": b, "patients": n} for (a, b), n in sorted(self.pairs.items())],
            "image_level_images": self.image_level_images,
        }


def audit(rows: pa.Table) -> AuditReport:
    """Images and patients per (dataset, split), and patients found in more than one split.

    ``rows`` needs ``dataset``, ``split`` and ``patient_key`` (``patient_basis`` is used
    when present: rows whose basis ends in ``-image`` count as image-level).
    """
    datasets = rows.column("dataset").to_pylist()
    splits = rows.column("split").to_pylist()
    patients = rows.column("patient_key").to_pylist()
    groups_of: dict[str, set[str]] = {}  # patient -> {"ds/split", ...}
    images: Counter[tuple[str, str]] = Counter()
    members: dict[tuple[str, str], set[str]] = {}
    for ds_name, split, patient in zip(datasets, splits, patients, strict=True):
        images[(ds_name, split)] += 1
        members.setdefault((ds_name, split), set()).add(patient)
        groups_of.setdefault(patient, set()).add(f"{ds_name}/{split}")
    pairs: Counter[tuple[str, str]] = Counter()
    overlapping = 0
    for groups in groups_of.values():
        if len({g.split("/", 1)[1] for g in groups}) < 2:
            continue  # one split, possibly in two datasets: that is how it should be
        overlapping += 1
        for a, b in combinations(sorted(groups), 2):
            if a.split("/", 1)[1] != b.split("/", 1)[1]:
                pairs[(a, b)] += 1
    image_level = 0
    if "patient_basis" in rows.column_names:
        basis = rows.column("patient_basis")
        image_level = int(pc.sum(pc.ends_with(pc.fill_null(basis, ""), "-image")).as_py() or 0)
    counts = [
        SplitCount(dataset=d, split=s, images=images[(d, s)], patients=len(members[(d, s)]))
        for d, s in sorted(images)
    ]
    return AuditReport(
        groups=counts,
        overlapping_patients=overlapping,
        pairs=dict(pairs),
        image_level_images=image_level,
    )


def held_out_overlap(train_rows: pa.Table, held_rows: pa.Table) -> set[str]:
    """The patient keys present in both a training selection and the held-out rows."""
    train = set(train_rows.column("patient_key").to_pylist())
    held = set(held_rows.column("patient_key").to_pylist())
    return (train & held) - {None}
