"""The report's figures, drawn from what the stages wrote.

- Figure 1: chest X-rays and their reconstructions by the AE and the VAE (same images).
- Figure 2: validation Dice per epoch of each arm: the mean over seeds and the band
  between the lowest and highest seed, a panel per label fraction.
- Pretraining: the classifiers against their majority share, and the cluster sizes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pneumo.experiment.tables import ARM_TITLES, PretrainRow

# The name of the per-epoch validation Dice in a run's metrics.jsonl (newest first): the
# evaluation-resolution change may rename it to say it is at training resolution.
VAL_DICE_FIELDS = ("val_dice_trainres", "val_dice")
_COLOURS = {
    "none": "tab:grey",
    "labels": "tab:blue",
    "pseudo": "tab:orange",
    "leaky": "tab:red",
    "imagenet": "tab:green",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def MaxNLocator(**kw: Any) -> Any:  # noqa: N802 - matplotlib's class, imported late
    from matplotlib.ticker import MaxNLocator as locator

    return locator(**kw)


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def val_dice_curve(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """Validation Dice per epoch from a run's metrics.jsonl rows (NaN where missing)."""
    name = next((f for f in VAL_DICE_FIELDS if any(f in r for r in rows)), VAL_DICE_FIELDS[-1])
    values = {int(r["epoch"]): r.get(name) for r in rows}
    return [float("nan") if values.get(e) is None else float(values[e]) for e in range(len(values))]


def dice_curves_figure(curves: Mapping[float, Mapping[str, Sequence[Sequence[float]]]]) -> bytes:
    """Figure 2: a panel per label fraction; per arm, validation Dice per epoch over seeds
    (mean line, min-max band).

    Args:
        curves: label fraction -> arm -> one curve per seed (Dice per epoch, fractions).
    """
    plt = _pyplot()
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(7 * n, 4.2), squeeze=False, sharey=True)
    for ax, (fraction, arms) in zip(axes[0], sorted(curves.items()), strict=True):
        _dice_panel(ax, arms)
        ax.set_title(f"{100 * fraction:g}% of training patients", fontsize=10)
    axes[0][0].set_ylabel("validation Dice (%)")
    fig.suptitle("Figure 2: validation Dice per epoch (mean over seeds; band: min-max)")
    fig.tight_layout()
    return _png(fig)


def _dice_panel(ax: Any, curves: Mapping[str, Sequence[Sequence[float]]]) -> None:
    """One panel of Figure 2: arm -> one curve per seed."""
    for arm, seeds in curves.items():
        length = max(len(c) for c in seeds)
        grid = np.full((len(seeds), length), np.nan)
        for i, curve in enumerate(seeds):
            grid[i, : len(curve)] = curve
        epochs = np.arange(1, length + 1)
        colour = _COLOURS.get(arm)
        mean = np.nanmean(grid, axis=0) * 100
        ax.plot(epochs, mean, marker="o", color=colour, label=f"{ARM_TITLES[arm]} (n={len(seeds)})")
        if len(seeds) > 1:
            low, high = np.nanmin(grid, axis=0) * 100, np.nanmax(grid, axis=0) * 100
            ax.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def reconstructions_figure(originals: np.ndarray, rows: Mapping[str, np.ndarray]) -> bytes:
    """Figure 1: a row of originals, then a row per autoencoder (``(K, H, W)`` in [0, 1])."""
    plt = _pyplot()
    panels = [("original", originals), *((k.upper(), v) for k, v in rows.items())]
    k = len(originals)
    fig, axes = plt.subplots(len(panels), k, figsize=(1.8 * k, 1.9 * len(panels)), squeeze=False)
    for r, (name, images) in enumerate(panels):
        for c in range(k):
            ax = axes[r][c]
            ax.imshow(images[c], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
    fig.suptitle("Figure 1: chest X-rays (top) reconstructed by each autoencoder")
    fig.tight_layout()
    return _png(fig)


def pretraining_figure(
    rows: Sequence[PretrainRow], sizes: Sequence[int], noise: float | None
) -> bytes:
    """Classifier metrics beside the majority share; cluster sizes (largest first)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["auroc", "balanced_accuracy", "accuracy", "majority_rate"]
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        values = [getattr(row, n) if getattr(row, n) is not None else np.nan for n in names]
        xs = np.arange(len(names)) + i * width
        left.bar(xs, values, width, label=row.arm, color=_COLOURS.get(row.arm))
    left.set_xticks(np.arange(len(names)) + width * (len(rows) - 1) / 2, names, fontsize=8)
    left.set_ylim(0, 1)
    left.set_title("pretraining classifiers on held-out rows")
    left.legend(fontsize=8)
    if sizes:
        right.bar(np.arange(1, len(sizes) + 1), sizes, color="tab:orange")
    noise_text = "" if noise is None else f" (noise share {100 * noise:.1f}%)"
    right.set_title(f"cluster sizes{noise_text}")
    right.set_xlabel("cluster (largest first)")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _png(fig)
