"""``pneumo evaluate classify``: a classify run's figures on a split, with its ROC curve.

Flow: load the checkpoint (``best`` by default) and rebuild the classifier; select the rows
(``--where``, or the ``--split`` of the datasets the run trained on), labelled the way the
run labelled its own (``has_ptx`` or its label table); stream them (each image once, no
augmentation); write into the RUN:

* ``eval/<split>.parquet``: one row per image (key, image id, dataset, label, predicted
  class, the probability of each class, and ``score``: of class 1 for two classes);
* ``eval/<split>-roc.png``: the ROC curve (one-vs-rest per class for N classes);
* ``eval/<split>.json``: the summary, also returned: ``auroc``, ``accuracy``,
  ``balanced_accuracy``, ``majority_rate`` (the accuracy of always guessing the most
  frequent class: judge ``accuracy`` against it), ``n_images``, ``n_classes``,
  ``class_counts``, ``loss``, and where it came from; the calibration (see
  :mod:`pneumo.evaluation.calibration`): ``ece`` (15 equal-width bins, of the probability
  of class 1 for two classes, of the top class else), ``ece_calibrated`` and
  ``temperature`` when the run holds a temperature for this checkpoint (``--calibrate``
  fits one on the run's val split first), ``calibration_split``; the JSON adds the bins;
* ``eval/<split>-reliability.png``: the reliability diagram, before and after.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pneumo.evaluation.calibration import (
    FIT_SPLIT,
    calibration_summary,
    fit_and_store,
    load_temperature,
    reliability_png,
    reliability_record,
)
from pneumo.evaluation.config import EvaluationConfig
from pneumo.metrics.calibration import scaled_probabilities, top_label
from pneumo.metrics.classification import classification_summary
from pneumo.shards import selections, stream
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import open_store
from pneumo.shards.verify import check_delivered
from pneumo.training.checkpoint import (
    CheckpointError,
    init_line,
    load_checkpoint,
    model_from_checkpoint,
)
from pneumo.training.classify import ClassifyConfig, ClassifyTask
from pneumo.training.data import LoaderConfig, eval_batches, select
from pneumo.training.rows import TRAIN_ROWS
from pneumo.training.runs import autocast, images_to
from pneumo.training.tracked import record_evaluation

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class EvaluateClassifyConfig(EvaluationConfig):
    """What to evaluate (see :class:`pneumo.evaluation.config.EvaluationConfig`): a
    ``train classify`` run; ``where`` replaces the split of the run's datasets.

    Attributes:
        calibrate: first fit a temperature on the run's val split (never ``split``'s rows)
            and store it in ``RUN/calibration.json``.
    """

    batch_size: int = 32
    calibrate: bool = False


def evaluate_classify(cfg: EvaluateClassifyConfig, progress: Progress | None = None) -> dict:
    """Score a classify run; writes per-image scores, the ROC curve and the summary.

    ``progress`` gets ``{"images": n}`` after each batch.

    Raises:
        CheckpointError: no such checkpoint, or not a classifier's.
        ConfigError: the selection holds no labelled image.
        IntegrityError: a selected image is missing from its shard, cut short or changed:
            a smaller or different set is never scored.
    """
    ckpt = load_checkpoint(cfg.run, cfg.checkpoint)
    if ckpt.get("task") != "classify":
        raise CheckpointError(f"{cfg.run} is a {ckpt.get('task')} run, not a classify run")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = model_from_checkpoint(ckpt, arch="classifier").to(device)
    task = ClassifyTask(ClassifyConfig(**ckpt["config"]))
    dataset = cfg.dataset or task.cfg.dataset
    where = cfg.where or _default_where(cfg)
    rows, columns = _infer(cfg, model, task, dataset, where, device, progress)
    check_delivered(
        stream.entries_from_table(rows), columns["key"],
        f"the evaluation of {cfg.run} on {cfg.split}",
    )  # fmt: skip
    labels, probs = np.asarray(columns["label"], np.int64), np.concatenate(columns["probs"])
    summary = {
        **classification_summary(labels, probs),
        "loss": float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                 torch.from_numpy(labels))),
        "split": cfg.split,
        "where": where,
        "dataset": dataset,
        "labels": task.cfg.labels,
        "checkpoint": cfg.checkpoint,
        "step": ckpt["step"],
        "init": init_line(ckpt.get("init", [])),
    }  # fmt: skip
    record = _temperature(cfg, model, task, dataset, device, ckpt["step"])
    logits = np.concatenate(columns["logits"])
    calibrated = _view(logits, labels, record["temperature"]) if record else None
    fields, bins, bins_after = calibration_summary(top_label(probs, labels), calibrated, record)
    summary.update(fields)
    summary = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}
    dataset_of = dict(zip(rows["key"].to_pylist(), rows["dataset"].to_pylist(), strict=True))
    table = _per_image(columns, labels, probs, dataset_of)
    title = f"{_name(cfg.run)}: {cfg.split}"
    figures = {
        "roc": _roc_png(labels, probs, title),
        "reliability": reliability_png(bins, bins_after, title),
    }
    _write(cfg, table, {**summary, "reliability": reliability_record(bins, bins_after)}, figures)
    log.info("%s on %s: AUROC %s (%d images)", cfg.run, cfg.split, summary["auroc"], len(labels))
    record_evaluation(cfg.run, cfg.split, asdict(cfg), summary)  # MLflow, when on
    return summary


def _infer(
    cfg: EvaluateClassifyConfig,
    model: torch.nn.Module,
    task: ClassifyTask,
    dataset: str,
    where: str,
    device: torch.device,
    progress: Progress | None,
) -> tuple[pa.Table, dict[str, list[Any]]]:
    """The labelled rows of ``where`` and, per image: key, image id, label, logits, probs."""
    rows = task.prepare_rows(select(dataset, where), train=False)
    if rows.num_rows == 0:
        raise ConfigError(f"--where {where!r} selects no labelled image in {dataset}")
    task.use_rows(rows, rows)
    loader = LoaderConfig(
        dataset=dataset,
        size=task.cfg.size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        augment=False,
        in_channels=task.cfg.in_channels,
    )
    entries = stream.entries_from_table(rows)
    columns: dict[str, list[Any]] = {
        "key": [], "image_id": [], "label": [], "probs": [], "logits": [],
    }  # fmt: skip
    with torch.no_grad(), autocast(device, bool(task.cfg.amp)):
        for batch in eval_batches(loader, rank=0, world_size=1, entries=entries):
            logits = model(images_to(device, batch["image"])).float()
            columns["logits"].append(logits.cpu().numpy())
            columns["probs"].append(torch.softmax(logits, dim=1).cpu().numpy())
            columns["key"] += batch["key"]
            columns["image_id"] += batch["image_id"]
            columns["label"] += [task.label_of[k] for k in batch["key"]]
            if progress is not None:
                progress({"images": len(columns["key"])})
    return rows, columns


def _view(logits: np.ndarray, labels: np.ndarray, temperature: float) -> tuple:
    """``(probability, event)`` whose calibration is measured, under ``temperature``."""
    return top_label(scaled_probabilities(logits, temperature), labels)


def _temperature(
    cfg: EvaluateClassifyConfig,
    model: torch.nn.Module,
    task: ClassifyTask,
    dataset: str,
    device: torch.device,
    step: int,
) -> dict[str, Any] | None:
    """With ``cfg.calibrate``: fit the temperature on the run's val split and store it;
    else the stored one, if it was fitted for this checkpoint's step."""
    model_info = {"checkpoint": cfg.checkpoint, "step": step}
    if not cfg.calibrate:
        return load_temperature(cfg.run, model_info)
    where = _default_where(replace(cfg, split=FIT_SPLIT))
    rows, columns = _infer(cfg, model, task, dataset, where, device, None)
    check_delivered(
        stream.entries_from_table(rows), columns["key"], f"the calibration of {cfg.run}"
    )
    return fit_and_store(
        cfg.run,
        np.concatenate(columns["logits"]),
        np.asarray(columns["label"], np.int64),
        probabilities=lambda z, t: _view(z, np.asarray(columns["label"]), t),
        fitted_on={"where": where, "dataset": dataset},
        model=model_info,
    )


def _default_where(cfg: EvaluateClassifyConfig) -> str:
    """``split`` of the datasets (nih, siim...) the run's pinned training rows came from."""
    store = open_store(cfg.run, create=False)
    if not store.exists(TRAIN_ROWS):
        return selections.every(cfg.split)
    names = sorted(set(pq.read_table(io.BytesIO(store.get(TRAIN_ROWS)), columns=["dataset"])
                       ["dataset"].to_pylist()))  # fmt: skip
    return f"dataset in {names!r} and split == {cfg.split!r}"


def _per_image(
    columns: dict[str, list[Any]], labels: np.ndarray, probs: np.ndarray, dataset_of: dict
) -> pa.Table:
    return pa.table(
        {
            "key": pa.array(columns["key"], pa.string()),
            "image_id": pa.array(columns["image_id"], pa.string()),
            "dataset": pa.array([dataset_of[k] for k in columns["key"]], pa.string()),
            "label": pa.array(labels, pa.int64()),
            "pred": pa.array(probs.argmax(axis=1), pa.int64()),
            "score": pa.array(probs[:, 1] if probs.shape[1] == 2 else probs.max(1), pa.float32()),
            "probs": pa.array(probs.astype(np.float32).tolist(), pa.list_(pa.float32())),
        }
    ).sort_by("key")


def _roc_png(labels: np.ndarray, probs: np.ndarray, title: str) -> bytes:
    """ROC curve(s): class 1 for two classes, one-vs-rest per class (at most 10) else."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from pneumo.metrics.classification import auroc

    fig, ax = plt.subplots(figsize=(5, 5))
    classes = [1] if probs.shape[1] == 2 else list(np.unique(labels))[:10]
    for c in classes:
        positive = labels == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        name = "pneumothorax / class 1" if probs.shape[1] == 2 else f"class {c} vs rest"
        ax.plot(fpr, tpr, label=f"{name}: AUROC {auroc(positive, probs[:, c]):.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance (AUROC 0.5)")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _name(run: str) -> str:
    return run.rstrip("/").rsplit("/", 1)[-1]


def _write(
    cfg: EvaluateClassifyConfig, table: pa.Table, summary: dict, figures: dict[str, bytes]
) -> None:
    store = open_store(cfg.run)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put(f"eval/{cfg.split}.parquet", buf.getvalue())
    for name, png in figures.items():
        store.put(f"eval/{cfg.split}-{name}.png", png)
    record = {**summary, "config": asdict(cfg)}
    store.put(f"eval/{cfg.split}.json", (json.dumps(record, indent=2) + "\n").encode())
