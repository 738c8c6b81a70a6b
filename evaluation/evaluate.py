"""``pneumo evaluate``: the SIIM score of a trained run on a labelled split.

Flow: load the checkpoint and the stored post-processing triplet of the RUN; stream the
split (each image once, no augmentation); predict (optionally with horizontal-flip TTA);
post-process; score each image; write ``RUN/eval/<split>.parquet`` (one row per image) and
``RUN/eval/<split>.json`` (the summary, also returned).

Resolution: images *and* masks are resized to the training size by the loader, and the
score is computed there. SIIM scored at 1024x1024; the two differ only in how mask borders
are rasterised, and scoring at 1024 would need the original masks, which the stream does
not carry. ``pneumo predict`` does upscale the probabilities to each image's original size.

The summary:

* ``dice``: the SIIM score, mean over images of per-image Dice (empty/empty = 1);
* ``dice_pos``: the mean over images with a true mask (the informative part);
  ``dice_neg``: the share of healthy images predicted empty; ``empty_dice``: what
  predicting nothing would score on the same images;
* ``n_images``, ``n_positive``;
* the classification view (an image is called positive when its mask is non-empty):
  ``accuracy``, ``sensitivity``, ``specificity``, and ``auc`` of the maximum probability.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from evaluation.inference import Predictor
from shards.errors import ConfigError
from shards.store import open_store
from training.data import LoaderConfig, eval_batches
from training.metrics import dice_from_counts, overlap_counts, siim_summary

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
RESULTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("key", pa.string()),
        ("has_ptx", pa.bool_()),
        ("pred_positive", pa.bool_()),
        ("dice", pa.float64()),
        ("pred_area", pa.int64()),  # pixels at the evaluation size (size x size)
        ("true_area", pa.int64()),
        ("max_prob", pa.float32()),
    ]
)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """What to evaluate.

    Attributes:
        run: the RUN (folder or s3://) of a segmentation training.
        dataset: the DATASET to read; None: the one the run trained on.
        split: the split to score (``test``, ``val``, ``train``).
        where: manifest filter; None: labelled SIIM images of ``split``.
        tta: horizontal-flip test-time augmentation.
        checkpoint: ``best``, ``last``, or the URL of a checkpoint file.
        workers: loader processes.
        batch_size: images per forward pass.
    """

    run: str
    dataset: str | None = None
    split: str = "test"
    where: str | None = None
    tta: bool = False
    checkpoint: str = "best"
    workers: int = 2
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError("batch_size must be >= 1 and workers >= 0")
        if not self.split.replace("_", "").isalnum():
            raise ConfigError(f"split {self.split!r} must be a plain name (test, val, train)")

    @property
    def selection(self) -> str:
        if self.where is not None:
            return self.where
        return f"dataset == 'siim' and split == {self.split!r} and has_ptx is not None"


def evaluate_segment(cfg: EvaluateConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Score a run on a split; writes per-image results and the summary into the RUN.

    ``progress`` gets ``{"images": n}`` after each batch.

    Raises:
        CheckpointError: the run has no such checkpoint.
        ConfigError: the selection holds no labelled image.
    """
    predictor = Predictor.load(cfg.run, cfg.checkpoint, tta=cfg.tta)
    dataset = cfg.dataset or predictor.checkpoint["config"]["dataset"]
    loader = LoaderConfig(
        dataset=dataset,
        where=cfg.selection,
        size=predictor.size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        augment=False,
        in_channels=predictor.in_channels,
    )
    columns: dict[str, list[Any]] = {name: [] for name in RESULTS_SCHEMA.names}
    for batch in eval_batches(loader, rank=0, world_size=1):
        _score_batch(predictor, batch, columns)
        if progress is not None:
            progress({"images": len(columns["key"])})
    if not columns["key"]:
        raise ConfigError(f"--where {cfg.selection!r} selects no labelled image in {dataset}")
    table = pa.Table.from_pydict(columns, schema=RESULTS_SCHEMA).sort_by("key")
    summary = {
        **_summarise(table),
        "split": cfg.split,
        "where": cfg.selection,
        "dataset": dataset,
        "checkpoint": cfg.checkpoint,
        "step": predictor.checkpoint["step"],
        "size": predictor.size,
        "tta": cfg.tta,
        "postprocess": predictor.post.to_dict(),
    }
    _write(cfg, table, summary)
    log.info("%s on %s: dice %.4f (%d images)", cfg.run, cfg.split, summary["dice"], len(table))
    return summary


def _score_batch(predictor: Predictor, batch: dict[str, Any], columns: dict[str, list]) -> None:
    """Predict, post-process and score one batch; append a row per image to ``columns``."""
    probs = predictor.probabilities(batch["image"]).cpu().numpy()
    pred = predictor.post.apply(probs)
    truth = batch["mask"][:, 0].numpy() > 0.5
    inter, pred_area, true_area = overlap_counts(pred, truth)
    columns["image_id"] += batch["image_id"]
    columns["key"] += batch["key"]
    columns["has_ptx"] += [bool(v) for v in batch["has_ptx"]]
    columns["pred_positive"] += (pred_area > 0).tolist()
    columns["dice"] += dice_from_counts(inter, pred_area, true_area).tolist()
    columns["pred_area"] += pred_area.tolist()
    columns["true_area"] += true_area.tolist()
    columns["max_prob"] += probs.reshape(len(probs), -1).max(axis=1).tolist()


def _summarise(table: pa.Table) -> dict[str, Any]:
    """SIIM Dice and the image-level classification view of per-image results."""
    dice = table["dice"].to_numpy()
    true_area = table["true_area"].to_numpy()
    label = table["has_ptx"].to_numpy(zero_copy_only=False)
    called = table["pred_positive"].to_numpy(zero_copy_only=False)
    out: dict[str, Any] = siim_summary(dice, true_area)
    tp, tn = int((called & label).sum()), int((~called & ~label).sum())
    out["accuracy"] = (tp + tn) / len(label)
    out["sensitivity"] = tp / int(label.sum()) if label.any() else float("nan")
    out["specificity"] = tn / int((~label).sum()) if (~label).any() else float("nan")
    out["auc"] = float("nan")
    if label.any() and (~label).any():
        from sklearn.metrics import roc_auc_score

        out["auc"] = float(roc_auc_score(label, table["max_prob"].to_numpy()))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _write(cfg: EvaluateConfig, table: pa.Table, summary: dict[str, Any]) -> None:
    store = open_store(cfg.run)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put(f"eval/{cfg.split}.parquet", buf.getvalue())
    record = {**summary, "config": asdict(cfg)}
    store.put(f"eval/{cfg.split}.json", (json.dumps(record, indent=2) + "\n").encode())
