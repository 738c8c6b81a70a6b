"""Tables a person can read: evaluation summaries side by side, every column explained.

:func:`dice_table` renders summaries of :func:`pneumo.evaluation.evaluate.evaluate_segment` (one
row per model, e.g. the report's Table 1) with the all-empty baseline of the same images
beside each model's Dice, and a legend under the table naming each column's JSON field.
:func:`summary_text` adds what was scored, for ``pneumo evaluate``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Column:
    """One column: its heading, the summary field it shows, and what it means."""

    head: str
    key: str
    legend: str
    percent: bool = True  # a fraction shown as a percentage with one decimal


COLUMNS: tuple[Column, ...] = (
    Column(
        head="Dice",
        key="dice",
        legend="SIIM score: mean per-image Dice at full resolution (healthy image left empty = 1)",
    ),
    Column(
        head="Empty",
        key="empty_baseline_dice",
        legend="the same score for predicting nothing on the same images: the baseline to beat",
    ),
    Column(head="Dice+", key="dice_pos", legend="mean Dice over the images with pneumothorax"),
    Column(head="Sens", key="sensitivity", legend="share of images with pneumothorax given a mask"),
    Column(head="Spec", key="specificity", legend="share of healthy images left empty"),
    Column(head="Images", key="n_images", legend="images scored", percent=False),
    Column(head="Pos", key="n_positive", legend="of which with pneumothorax", percent=False),
)


def dice_table(
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    columns: Sequence[Column] = COLUMNS,
    *,
    legend: bool = True,
) -> str:
    """Summaries as an aligned text table, fractions in percent, and a legend under it.

    Args:
        rows: ``(model name, summary)`` pairs; a missing or null field shows as ``-``.
        columns: the columns to show (default: :data:`COLUMNS`).
        legend: add one line per column: heading, JSON field, meaning.
    """
    cells = [
        [name] + [_cell(summary.get(c.key), c.percent) for c in columns] for name, summary in rows
    ]
    heads = ["Model"] + [c.head for c in columns]
    widths = [max(len(r[i]) for r in [heads, *cells]) for i in range(len(heads))]

    def line(values: list[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = (v.rjust(max(w, 6)) for v, w in zip(values[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    out = [line(heads)]
    out.append("-" * len(out[0]))
    out += [line(r) for r in cells]
    if legend:
        pad = max(len(c.head) for c in columns)
        out.append("")
        out += [f"{c.head.ljust(pad)}  {c.key}: {c.legend}" for c in columns]
        if any(c.percent for c in columns):
            out.append("(fractions in percent)")
    return "\n".join(out)


def summary_text(name: str, summary: Mapping[str, Any]) -> str:
    """``pneumo evaluate``'s table: :func:`dice_table` for one run, then what was scored."""
    post = summary.get("postprocess") or {}
    triplet = (
        f"calls an image positive with >= {post.get('min_area')} px (of a 1024x1024 image) "
        f"above p {post.get('top_threshold')}, then masks p > {post.get('mask_threshold')}"
        if post
        else "none"
    )
    details = [
        f"split {summary.get('split')} ({summary.get('where')}) of {summary.get('dataset')}",
        f"checkpoint {summary.get('checkpoint')} (step {summary.get('step')}), "
        f"input {summary.get('size')} px, scored at {summary.get('resolution', '?')} resolution, "
        f"flip TTA {'on' if summary.get('tta') else 'off'}",
        f"post-processing: {triplet}",
        f"auc {_plain(summary.get('auc'))} (max probability as the positive score), "
        f"accuracy {_plain(summary.get('accuracy'))}, "
        f"dice_neg {_plain(summary.get('dice_neg'))} (healthy images left empty)",
    ]
    if summary.get("ece") is not None:
        after = (
            f", {_plain(summary.get('ece_calibrated'))} after temperature "
            f"{_plain(summary.get('temperature'))} (fitted on {summary.get('calibration_split')})"
            if summary.get("temperature") is not None
            else " (no temperature: --calibrate fits one on val)"
        )
        details.append(
            f"calibration: ECE {_plain(summary['ece'])} of the max probability against "
            f"pneumothorax ({summary.get('ece_bins')} equal-width bins){after}"
        )
    return dice_table([(name, summary)]) + "\n\n" + "\n".join(details)


def _cell(value: Any, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if percent else str(value)


def _plain(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"
