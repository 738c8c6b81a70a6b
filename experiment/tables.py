"""Table 1 (segmentation per arm) and the pretraining table, as Markdown and CSV.

Dice values are shown in percent, as the report gives them; the CSV keeps fractions with
full precision (``dice_mean`` is exactly the mean of the evaluations' ``dice``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from pneumo.experiment.stats import RESAMPLED, difference_interval, mean_interval, mean_sd

# The report's Table 1 (Dice, percent).
REPORT_DICE = {"none": 71.6, "labels": 76.4, "pseudo": 75.8}
ARM_TITLES = {
    "none": "No additional pretrain",
    "labels": "Pretrain with labels",
    "pseudo": "Pretrain with pseudo-labels",
    "leaky": "Pretrain with labels + SIIM val/test patients (leaky)",
    "imagenet": "Pretrain on ImageNet (ResNet-34 weights file)",
}


@dataclass(frozen=True, kw_only=True)
class ArmRow:
    """One row of Table 1: an arm over its seeds (Dice as fractions)."""

    arm: str
    title: str
    report_dice: float | None  # percent, as printed in the report
    seeds: int
    dice_mean: float
    dice_sd: float | None
    dice_pos_mean: float | None
    dice_pos_sd: float | None
    empty_dice: float | None  # what predicting nothing scores on the same images
    n_images: int
    n_positive: int
    diff_to_none: float | None  # mean paired difference to the none arm
    ci_low: float | None
    ci_high: float | None
    # The interval of dice_mean and what went into every interval of the row (patients and
    # each arm's seeds resampled, see pneumo.experiment.stats).
    dice_low: float | None = None
    dice_high: float | None = None
    n_patients: int | None = None
    resamples: int | None = None


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """A paired difference between two arms with its bootstrap interval."""

    arm: str
    base: str
    mean: float
    low: float
    high: float
    n_patients: int | None = None
    n_images: int | None = None
    seeds: int | None = None
    base_seeds: int | None = None


def per_image_dice(table: Any) -> dict[str, float]:
    """Image id -> Dice from an evaluation's per-image Parquet table."""
    ids = table.column("image_id").to_pylist()
    return dict(zip(ids, table.column("dice").to_pylist(), strict=True))


def compare(
    per_image: Mapping[tuple[str, int], Mapping[str, float]],
    arm: str,
    base: str,
    seeds: Sequence[int],
    *,
    patients: Mapping[str, str],
    resamples: int,
    seed: int,
    level: float,
) -> Comparison:
    """``arm - base`` with its interval: paired by image, patients and seeds resampled."""
    d = difference_interval(
        [per_image[(arm, s)] for s in seeds],
        [per_image[(base, s)] for s in seeds],
        patients,
        resamples=resamples,
        seed=seed,
        level=level,
    )
    return Comparison(
        arm=arm, base=base, mean=d.estimate, low=d.low, high=d.high, n_patients=d.n_patients,
        n_images=d.n_images, seeds=d.seeds, base_seeds=d.base_seeds,
    )  # fmt: skip


def table1_rows(
    summaries: Mapping[tuple[str, int], Mapping[str, Any]],
    per_image: Mapping[tuple[str, int], Mapping[str, float]],
    arms: Sequence[str],
    seeds: Sequence[int],
    *,
    patients: Mapping[str, str],
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> list[ArmRow]:
    """Per arm: Dice mean and sd over seeds with its interval, Dice on positives, the
    difference to ``none`` with its interval.

    Args:
        summaries: ``(arm, seed)`` -> evaluation summary (``dice``, ``dice_pos``, ...).
        per_image: ``(arm, seed)`` -> image id -> Dice.
        patients: image id -> patient key, for every scored image.
    """
    stats = {"patients": patients, "resamples": resamples, "seed": seed, "level": level}
    rows = []
    for arm in arms:
        runs = [summaries[(arm, s)] for s in seeds]
        dice, dice_sd = mean_sd([r["dice"] for r in runs])
        pos = [r["dice_pos"] for r in runs if r.get("dice_pos") is not None]
        pos_mean, pos_sd = mean_sd(pos) if pos else (None, None)
        own = mean_interval([per_image[(arm, s)] for s in seeds], **stats)
        diff = compare(per_image, arm, "none", seeds, **stats) if arm != "none" else None
        empty = runs[0].get("empty_baseline_dice", runs[0].get("empty_dice"))
        rows.append(
            ArmRow(
                arm=arm,
                title=ARM_TITLES[arm],
                report_dice=REPORT_DICE.get(arm),
                seeds=len(runs),
                dice_mean=dice,
                dice_sd=dice_sd,
                dice_pos_mean=pos_mean,
                dice_pos_sd=pos_sd,
                empty_dice=empty,
                n_images=int(runs[0]["n_images"]),
                n_positive=int(runs[0]["n_positive"]),
                diff_to_none=diff.mean if diff else None,
                ci_low=diff.low if diff else None,
                ci_high=diff.high if diff else None,
                dice_low=own.low,
                dice_high=own.high,
                n_patients=own.n_patients,
                resamples=own.resamples,
            )
        )
    return rows


def _pct(value: float | None, sd: float | None = None, *, sign: bool = False) -> str:
    if value is None:
        return "—"
    text = f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"
    return text if sd is None else f"{text} ± {100 * sd:.1f}"


def table1_markdown(
    rows: Sequence[ArmRow],
    level: float = 0.95,
    leakage: Comparison | None = None,
    sweep: Mapping[str, Sequence[FractionCell]] | None = None,
) -> str:
    """Table 1 as Markdown: the report's number beside ours, and what stands behind it;
    with ``sweep`` (arm -> :func:`fraction_cells`), a column per label fraction."""
    ci = f"{round(100 * level)}% CI"
    head = (
        f"| Model | Report | Dice (ours) [{ci}] | Dice on positives | Δ vs none [{ci}] | seeds "
        f"| test images (positive) |"
    )
    head += _sweep_head(sweep, ci)
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(_fractions(sweep))]
    for r in rows:
        report = "—" if r.report_dice is None else f"{r.report_dice:.1f}"
        delta = "—"
        if r.diff_to_none is not None:
            delta = f"{_pct(r.diff_to_none, sign=True)} [{_pct(r.ci_low, sign=True)}, "
            delta += f"{_pct(r.ci_high, sign=True)}]"
        dice = _pct(r.dice_mean, r.dice_sd)
        if r.dice_low is not None and r.dice_high is not None:
            dice += f" [{_pct(r.dice_low)}, {_pct(r.dice_high)}]"
        lines.append(
            f"| {r.title} | {report} | {dice} "
            f"| {_pct(r.dice_pos_mean, r.dice_pos_sd)} | {delta} | {r.seeds} "
            f"| {r.n_images} ({r.n_positive}) |" + _sweep_row(sweep, r.arm)
        )
    notes = [
        "",
        "Dice: the SIIM metric (mean over test images of per-image Dice, an empty truth "
        "predicted empty scoring 1), in percent, mean ± sd over seeds.",
    ]
    if rows and rows[0].empty_dice is not None:
        notes.append(
            f"Predicting no pneumothorax at all scores {_pct(rows[0].empty_dice)} on these "
            "images; Dice on positives is the informative part."
        )
    notes.append("Δ: difference to the none arm, paired by image (the same test images).")
    notes += _interval_note(rows, ci)
    notes += _sweep_note(sweep)
    if leakage is not None:
        notes.append(
            f"Leakage effect (leaky − labels): {_pct(leakage.mean, sign=True)} "
            f"[{_pct(leakage.low, sign=True)}, {_pct(leakage.high, sign=True)}]."
        )
    return "\n".join(lines + notes) + "\n"


def _interval_note(rows: Sequence[ArmRow], ci: str) -> list[str]:
    """What the intervals resampled, and how many patients, images and seeds went in."""
    if not rows or rows[0].n_patients is None:
        return []
    r = rows[0]
    seeds = sorted({row.seeds for row in rows})
    per_arm = f"{seeds[0]} seeds" if len(seeds) == 1 else "the seeds listed"
    return [
        f"{ci}: percentile bootstrap ({r.resamples:,} resamples) of {RESAMPLED}; the same "
        f"patients for both arms of a Δ: {r.n_patients} patients, {r.n_images} images, "
        f"{per_arm} per arm."
    ]


@dataclass(frozen=True, kw_only=True)
class FractionCell:
    """An arm at one label fraction: its Table 1 numbers from that fraction's runs."""

    fraction: float  # of the SIIM training patients
    dice_mean: float
    dice_sd: float | None
    diff_to_none: float | None
    ci_low: float | None
    ci_high: float | None


_CELL_VALUES = ("dice_mean", "dice_sd", "diff_to_none", "ci_low", "ci_high")


def fraction_cells(
    rows_by_fraction: Mapping[float, Sequence[ArmRow]],
) -> dict[str, list[FractionCell]]:
    """Arm -> its cells, fraction ascending, from each fraction's :func:`table1_rows`."""
    cells: dict[str, list[FractionCell]] = {}
    for fraction in sorted(rows_by_fraction):
        for r in rows_by_fraction[fraction]:
            values = {name: getattr(r, name) for name in _CELL_VALUES}
            cells.setdefault(r.arm, []).append(FractionCell(fraction=fraction, **values))
    return cells


def _fractions(sweep: Mapping[str, Sequence[FractionCell]] | None) -> list[float]:
    return [c.fraction for c in next(iter(sweep.values()))] if sweep else []


def _share(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _sweep_head(sweep: Mapping[str, Sequence[FractionCell]] | None, ci: str) -> str:
    return "".join(f" Dice, {_share(f)} of patients (Δ [{ci}]) |" for f in _fractions(sweep))


def _sweep_row(sweep: Mapping[str, Sequence[FractionCell]] | None, arm: str) -> str:
    out = ""
    for c in sweep[arm] if sweep else ():
        delta = ""
        if c.diff_to_none is not None:
            delta = f" ({_pct(c.diff_to_none, sign=True)} [{_pct(c.ci_low, sign=True)}, "
            delta += f"{_pct(c.ci_high, sign=True)}])"
        out += f" {_pct(c.dice_mean, c.dice_sd)}{delta} |"
    return out


def _sweep_note(sweep: Mapping[str, Sequence[FractionCell]] | None) -> list[str]:
    fractions = _fractions(sweep)
    if not fractions:
        return []
    return [
        f"Label fractions: every arm and seed also trained on {', '.join(map(_share, fractions))}"
        " of the SIIM training patients (whole patients, nested subsets; the same validation "
        f"and test images); the other columns are at {_share(fractions[-1])}."
    ]


def table1_csv(
    rows: Sequence[ArmRow], sweep: Mapping[str, Sequence[FractionCell]] | None = None
) -> str:
    """Table 1's rows as CSV; with ``sweep``, ``<value>_at_<fraction>`` columns per fraction
    (``dice_mean_at_0.01``...)."""
    if not sweep:
        return to_csv(rows)
    table = []
    for r in rows:
        row = asdict(r)
        for c in sweep[r.arm]:
            row |= {f"{name}_at_{c.fraction:g}": getattr(c, name) for name in _CELL_VALUES}
        table.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def to_csv(rows: Sequence[Any]) -> str:
    """Dataclass rows as CSV with a header (empty cells for None)."""
    if not rows:
        return ""
    buf = io.StringIO()
    names = [f.name for f in fields(rows[0])]
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    return buf.getvalue()


@dataclass(frozen=True, kw_only=True)
class PretrainRow:
    """A pretraining classifier on its held-out rows (classes: pneumothorax or clusters)."""

    arm: str
    labels: str
    auroc: float | None
    balanced_accuracy: float | None
    accuracy: float | None
    majority_rate: float | None
    n_images: int | None


def pretrain_rows(
    evaluations: Mapping[str, Mapping[str, Any]], pseudo_classes: int | None = None
) -> list[PretrainRow]:
    """One row per classifier arm from its ``evaluate-classify`` result."""
    return [
        PretrainRow(
            arm=arm,
            labels=f"{pseudo_classes} pseudo-classes" if arm == "pseudo" else "pneumothorax",
            auroc=r.get("auroc"),
            balanced_accuracy=r.get("balanced_accuracy"),
            accuracy=r.get("accuracy"),
            majority_rate=r.get("majority_rate"),
            n_images=r.get("n_images"),
        )
        for arm, r in evaluations.items()
    ]


def pretrain_markdown(rows: Sequence[PretrainRow], cluster: Mapping[str, Any] | None) -> str:
    """The pretraining results: classifiers beside their majority share, and the clusters."""
    lines = [
        "| Classifier | Classes | AUROC | Balanced accuracy | Accuracy | Majority share "
        "| test images |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {ARM_TITLES[r.arm]} | {r.labels} | {_num(r.auroc)} "
            f"| {_pct(r.balanced_accuracy)} | {_pct(r.accuracy)} | {_pct(r.majority_rate)} "
            f"| {r.n_images if r.n_images is not None else '—'} |"
        )
    lines.append("")
    lines.append(
        "The report: 77% accuracy with labels, 31.91% on 14 pseudo-classes — neither "
        "readable without the majority share beside it."
    )
    if cluster:
        sizes = cluster_sizes(cluster)
        lines += [
            "",
            f"Clusters: {len(sizes)} ({cluster.get('method', '?')}), sizes "
            f"{', '.join(map(str, sizes))}; noise share {_pct(cluster.get('noise_share'))}, "
            f"largest-cluster share {_pct(cluster.get('majority_share'))}.",
        ]
    return "\n".join(lines) + "\n"


def cluster_sizes(cluster: Mapping[str, Any]) -> list[int]:
    """Cluster sizes, largest first, from a cluster stage's result (noise not included)."""
    return sorted((int(s) for s in cluster["sizes"]), reverse=True)


def pseudo_classes(cluster: Mapping[str, Any]) -> int:
    """The classes the pseudo-label classifier learns: the clusters, plus noise when it is
    kept as a class of its own."""
    return int(cluster["clusters"]) + (cluster.get("noise_label") is not None)


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
