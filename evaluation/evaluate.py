"""``pneumo evaluate``: the SIIM score of a trained run on a labelled split.

Flow: load the checkpoint and the stored post-processing triplet of the RUN; stream the
split (each image once, no augmentation); predict at the training size (with horizontal-flip
TTA when the triplet was searched with it); upsample each probability map to its image's
stored size and post-process it there, as ``pneumo predict`` does; score it against the
stored full-size mask; write ``RUN/eval/<split>.parquet`` (one row per image) and
``RUN/eval/<split>.json`` (the summary, also returned).

Resolution: every figure here is the SIIM metric exactly, at each image's full resolution
(1024x1024 for SIIM), not at the training size, which overstates it (see
:mod:`pneumo.training.fullres`). ``pneumo predict``'s CSV, scored by any SIIM scorer, gives the
same number.

The summary:

* ``dice``: the SIIM score, mean over images of per-image Dice (empty/empty = 1);
* ``dice_pos``: the mean over images with a true mask (the informative part);
  ``dice_neg``: the share of healthy images predicted empty; ``empty_baseline_dice``: what
  predicting nothing would score on the same images (the share of healthy images);
* ``n_images``, ``n_positive``;
* the classification view (an image is called positive when its mask is non-empty):
  ``accuracy``, ``sensitivity``, ``specificity``, and ``auc`` of the maximum probability;
* what was scored: ``split``, ``where``, ``dataset``, ``checkpoint``, ``step``, ``size``
  (the model's input side), ``resolution``, ``tta``, ``postprocess``;
* the calibration of the image-level probability ``max_prob`` against ``has_ptx`` (see
  :mod:`pneumo.evaluation.calibration`): ``ece`` (15 equal-width bins), ``ece_calibrated``
  and ``temperature`` when the run holds a temperature for this checkpoint and TTA setting
  (``calibrate`` fits one on the SIIM val split first), ``calibration_split``; the JSON adds
  the bins, and ``RUN/eval/<split>-reliability.png`` draws them.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pneumo.evaluation.calibration import (
    FIT_SPLIT,
    calibration_summary,
    fit_and_store,
    load_temperature,
    reliability_png,
    reliability_record,
)
from pneumo.evaluation.config import EvaluationConfig
from pneumo.evaluation.inference import Predictor
from pneumo.metrics.calibration import logit, scale_probability, sigmoid
from pneumo.metrics.siim import dice_from_counts, siim_summary
from pneumo.shards import selections, stream
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import open_store
from pneumo.shards.verify import check_delivered
from pneumo.training.data import LoaderConfig, eval_batches, select
from pneumo.training.fullres import FullResMasks, score_batch
from pneumo.training.tracked import record_evaluation

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
RESULTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("key", pa.string()),
        ("has_ptx", pa.bool_()),
        ("pred_positive", pa.bool_()),
        ("dice", pa.float64()),
        ("pred_area", pa.int64()),  # pixels at the image's full resolution
        ("true_area", pa.int64()),
        ("max_prob", pa.float32()),  # the image's highest probability: its positive score
    ]
)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(EvaluationConfig):
    """What to evaluate (see :class:`pneumo.evaluation.config.EvaluationConfig`): a segmentation
    run; ``where`` None selects the labelled SIIM images of ``split``.

    Attributes:
        tta: horizontal-flip test-time augmentation; None: as the run's post-processing
            was chosen (each setting is applied with the triplet searched under it).
        calibrate: first fit a temperature on the SIIM val split of the dataset (never
            ``split``'s rows) and store it in ``RUN/calibration.json``.
    """

    tta: bool | None = None
    calibrate: bool = False

    @property
    def selection(self) -> str:
        if self.where is not None:
            return self.where
        return selections.siim(self.split)


def evaluate_segment(cfg: EvaluateConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Score a run on a split; writes per-image results and the summary into the RUN.

    ``progress`` gets ``{"images": n}`` after each batch.

    Raises:
        CheckpointError: the run has no such checkpoint.
        ConfigError: the selection holds no image, or the run no triplet for ``tta``.
        MaskError: a selected image is unlabelled or its stored mask is unusable.
        IntegrityError: a selected image is missing from its shard, cut short or changed:
            a smaller or different set is never scored.
    """
    predictor = Predictor.load(cfg.run, cfg.checkpoint, tta=cfg.tta)
    dataset = cfg.dataset or predictor.checkpoint["config"]["dataset"]
    table = _score_rows(cfg, predictor, dataset, cfg.selection, progress)
    summary = {
        **_summarise(table),
        "split": cfg.split,
        "where": cfg.selection,
        "dataset": dataset,
        "checkpoint": cfg.checkpoint,
        "step": predictor.checkpoint["step"],
        "size": predictor.size,
        "resolution": "full",  # each image's stored size
        "tta": predictor.tta,
        "postprocess": predictor.post.to_dict(),
    }
    record = _temperature(cfg, predictor, dataset)
    max_prob = table["max_prob"].to_numpy().astype(np.float64)
    has_ptx = table["has_ptx"].to_numpy(zero_copy_only=False)
    after = (scale_probability(max_prob, record["temperature"]), has_ptx) if record else None
    fields, bins, bins_after = calibration_summary((max_prob, has_ptx), after, record)
    summary.update(fields)
    png = reliability_png(bins, bins_after, f"{cfg.run.rstrip('/').rsplit('/', 1)[-1]}: "
                          f"{cfg.split}, image-level max probability")  # fmt: skip
    _write(cfg, table, {**summary, "reliability": reliability_record(bins, bins_after)}, png)
    log.info("%s on %s: dice %.4f (%d images)", cfg.run, cfg.split, summary["dice"], len(table))
    record_evaluation(cfg.run, cfg.split, asdict(cfg), summary)  # MLflow, when on
    return summary


def _score_rows(
    cfg: EvaluateConfig,
    predictor: Predictor,
    dataset: str,
    selection: str,
    progress: Progress | None,
) -> pa.Table:
    """Predict and score every row of ``selection``: one row of RESULTS_SCHEMA per image."""
    rows = select(dataset, selection)
    if rows.num_rows == 0:
        raise ConfigError(f"--where {selection!r} selects no labelled image in {dataset}")
    masks = FullResMasks(dataset, rows)
    loader = LoaderConfig(
        dataset=dataset,
        where=selection,
        size=predictor.size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        augment=False,
        in_channels=predictor.in_channels,
    )
    entries = stream.entries_from_table(rows)  # the rows selected above, read once
    columns: dict[str, list[Any]] = {name: [] for name in RESULTS_SCHEMA.names}
    for batch in eval_batches(loader, rank=0, world_size=1, entries=entries):
        _score_batch(predictor, batch, masks, columns)
        if progress is not None:
            progress({"images": len(columns["key"])})
    check_delivered(entries, columns["key"], f"the evaluation of {cfg.run} on {selection}")
    return pa.Table.from_pydict(columns, schema=RESULTS_SCHEMA).sort_by("key")


def _temperature(cfg: EvaluateConfig, predictor: Predictor, dataset: str) -> dict | None:
    """With ``cfg.calibrate``: fit the temperature of the image-level probability on the
    SIIM val split and store it; else the stored one, if fitted for this step and TTA."""
    model = {"checkpoint": cfg.checkpoint, "step": predictor.checkpoint["step"]}
    model["tta"] = predictor.tta
    if not cfg.calibrate:
        return load_temperature(cfg.run, model)
    where = selections.siim(FIT_SPLIT)
    val = _score_rows(cfg, predictor, dataset, where, None)
    max_prob = val["max_prob"].to_numpy().astype(np.float64)
    has_ptx = val["has_ptx"].to_numpy(zero_copy_only=False)
    return fit_and_store(
        cfg.run,
        logit(max_prob),
        has_ptx.astype(np.int64),
        probabilities=lambda z, t: (sigmoid(z / t), has_ptx),
        fitted_on={"where": where, "dataset": dataset},
        model=model,
    )


def _score_batch(
    predictor: Predictor, batch: dict[str, Any], masks: FullResMasks, columns: dict[str, list]
) -> None:
    """Predict one batch, score it at full resolution; append a row per image to ``columns``."""
    probs = predictor.probabilities(batch["image"])
    counts = score_batch(probs, batch, masks, predictor.post)
    dice = dice_from_counts(counts["inter"], counts["pred_area"], counts["true_area"])
    columns["image_id"] += batch["image_id"]
    columns["key"] += batch["key"]
    columns["has_ptx"] += [bool(v) for v in batch["has_ptx"]]
    columns["pred_positive"] += [area > 0 for area in counts["pred_area"]]
    columns["dice"] += dice.tolist()
    columns["pred_area"] += counts["pred_area"]
    columns["true_area"] += counts["true_area"]
    columns["max_prob"] += counts["max_prob"]


def _summarise(table: pa.Table) -> dict[str, Any]:
    """SIIM Dice and the image-level classification view of per-image results."""
    dice = table["dice"].to_numpy()
    true_area = table["true_area"].to_numpy()
    label = table["has_ptx"].to_numpy(zero_copy_only=False)
    called = table["pred_positive"].to_numpy(zero_copy_only=False)
    out: dict[str, Any] = siim_summary(dice, true_area)
    out["empty_baseline_dice"] = out.pop("empty_dice")  # the name the reports use
    tp, tn = int((called & label).sum()), int((~called & ~label).sum())
    out["accuracy"] = (tp + tn) / len(label)
    out["sensitivity"] = tp / int(label.sum()) if label.any() else float("nan")
    out["specificity"] = tn / int((~label).sum()) if (~label).any() else float("nan")
    out["auc"] = float("nan")
    if label.any() and (~label).any():
        from sklearn.metrics import roc_auc_score

        out["auc"] = float(roc_auc_score(label, table["max_prob"].to_numpy()))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _write(cfg: EvaluateConfig, table: pa.Table, summary: dict[str, Any], png: bytes) -> None:
    store = open_store(cfg.run)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put(f"eval/{cfg.split}.parquet", buf.getvalue())
    store.put(f"eval/{cfg.split}-reliability.png", png)
    record = {**summary, "config": asdict(cfg)}
    store.put(f"eval/{cfg.split}.json", (json.dumps(record, indent=2) + "\n").encode())
