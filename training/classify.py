"""``pneumo train classify``: a ResNet-34 classifier on streamed shards, a task of the shared loop.

The report's supervised pretraining arm: classify pneumothorax on NIH ChestX-ray14, then
use the trunk as the U-Net encoder (``pneumo train segment --encoder-init CLASSIFY_RUN``).
This file owns what is particular to classification; :mod:`pneumo.training.loop` owns the rest.
Read top to bottom:

1. the config: NIH train rows validated on NIH val rows; the labels, ``has_ptx`` or a
   label table (Parquet ``key``, ``label``, joined by key; its fingerprint in every
   checkpoint); how batches mix the classes (``balance``);
2. the rows: rows without a label are left out; the rest get a ``label`` column and are
   pinned with the run (so a run's labels never change under it);
3. the stream: ``classes`` draws every class equally often (the streaming form of a
   class-weighted sampler: the report's over-sampled positives, DeepCluster's uniform
   clusters), ``pos-rate:A[:B]`` draws positives at that rate, ``none`` as they come;
4. the model: a torchvision ResNet-34 (the module smp's encoder is) with a 1-channel stem
   and one logit per class;
5. the optimizer: SGD at 1e-3 with momentum 0.9 (or Adam); the learning rate divided by
   10 after 5 epochs without a lower validation loss (ReduceLROnPlateau), stepped with the
   loss of all ranks' images together, so every rank steps alike;
6. the step: cross-entropy on the logits;
7. validation: loss, accuracy, balanced accuracy, AUROC (macro one-vs-rest for N classes)
   and the majority-class rate beside them (:mod:`pneumo.metrics.classification`); ``best.pt``
   is the best ``val_auroc``.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pneumo.metrics.classification import classification_summary
from pneumo.shards import selections, stream
from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.store import is_s3_url, open_store, read_url
from pneumo.training import loop
from pneumo.training.data import LoaderConfig
from pneumo.training.job import Job, Progress
from pneumo.training.model import CLASSIFIER_ARCHS, build_classifier, classifier_args
from pneumo.training.runs import LR_PANEL, Panel, images_to
from pneumo.training.task import RunConfig, Task, absolute

log = logging.getLogger(__name__)

HAS_PTX = "has_ptx"
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True, kw_only=True)
class ClassifyConfig(RunConfig):
    """Everything a classification run depends on (with :class:`pneumo.training.task.RunConfig`).

    Attributes:
        labels: ``"has_ptx"`` (pneumothorax yes/no), or a Parquet label table (file, folder
            or ``s3://``) with columns ``key`` (string) and ``label`` (int >= 0).
        arch: the torchvision ResNet (``resnet34``: the report's, and the U-Net encoder's).
        optimizer: ``sgd`` or ``adam``.
        lr, momentum: the optimizer's learning rate and (SGD) momentum.
        plateau_patience: epochs without a lower validation loss before the lr is lowered.
        plateau_factor: what the lr is multiplied by then.
        balance: ``classes``, ``pos-rate:A`` / ``pos-rate:A:B`` (two classes; A sliding to
            B over the run), or ``none``.
    """

    where: str = selections.NIH_TRAIN
    val_where: str = selections.NIH_VAL
    batch_size: int = 32
    labels: str = HAS_PTX
    arch: str = "resnet34"
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    plateau_patience: int = 5
    plateau_factor: float = 0.1
    balance: str = "classes"
    precise_bn: int = 16  # see RunConfig: eval-mode BatchNorm must match the weights

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels != HAS_PTX:
            object.__setattr__(self, "labels", absolute(self.labels))
        if self.arch not in CLASSIFIER_ARCHS:
            raise ConfigError(f"--arch {self.arch!r}: expected one of {CLASSIFIER_ARCHS}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer!r}: expected one of {OPTIMIZERS}")
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise ConfigError("--lr must be > 0 and --momentum in [0, 1)")
        if self.plateau_patience < 0 or not 0 < self.plateau_factor < 1:
            raise ConfigError("--plateau-patience must be >= 0 and --plateau-factor in (0, 1)")
        if self.size < 32:
            raise ConfigError(f"--size {self.size}: a ResNet needs at least 32 pixels")
        self.pos_rate()  # parses --balance
        LoaderConfig(  # the loader's own checks: batch size, workers, channels...
            dataset=self.dataset,
            size=self.size,
            batch_size=self.batch_size,
            workers=self.loader_workers,
            seed=self.seed,
            pos_rate=self.pos_rate(),
            in_channels=self.in_channels,
        )

    def pos_rate(self) -> tuple[float, float] | None:
        """The positive rate of ``balance="pos-rate:A[:B]"``, else None."""
        if self.balance in ("none", "classes"):
            return None
        head, _, rate = self.balance.partition(":")
        try:
            parts = [float(x) for x in rate.split(":")]
        except ValueError:
            parts = []
        if head != "pos-rate" or len(parts) not in (1, 2) or not all(0 < p < 1 for p in parts):
            raise ConfigError(
                f"--balance {self.balance!r}: expected classes, none, or pos-rate:A[:B] with "
                "rates strictly between 0 and 1 (e.g. pos-rate:0.5)"
            )
        return parts[0], parts[-1]


def train_classify(cfg: ClassifyConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train (or resume) a classification run; under torchrun every rank calls this.

    Returns the loop's summary (see :func:`pneumo.training.loop.run`) with ``val_auroc``,
    ``val_accuracy``, ``val_balanced_accuracy``, ``val_majority_rate``, ``best_val_auroc``.
    """
    return loop.run(ClassifyTask(cfg), progress)


class ClassifyTask(Task):
    """A ResNet on image labels: rows and labels, model, step, validation, optimizer."""

    name = "classify"
    best = ("val_auroc", "max")
    headline = (
        "train_loss",
        "val_loss",
        "val_auroc",
        "val_balanced_accuracy",
        "val_accuracy",
        "val_majority_rate",
    )
    panels = (
        Panel(
            "loss (cross-entropy)",
            (("train_loss", "training loss"), ("val_loss", "validation loss")),
        ),
        Panel(
            "validation",
            (
                ("val_auroc", "AUROC"),
                ("val_balanced_accuracy", "balanced accuracy"),
                ("val_accuracy", "accuracy"),
                ("val_majority_rate", "baseline: always the majority class"),
            ),
        ),
        LR_PANEL,
    )
    schedule_on = "val_loss"
    cfg: ClassifyConfig

    def __init__(self, cfg: ClassifyConfig) -> None:
        super().__init__(cfg)
        self._table: dict[str, int] | None = None  # the label table, read once
        self._table_fingerprint = ""
        self.label_of: dict[str, int] = {}  # key -> label of the pinned rows
        self.num_classes = 2

    # --- the rows and their labels

    def prepare_rows(self, rows: pa.Table, *, train: bool) -> pa.Table:
        """The rows with a label, with it as a ``label`` column (int64)."""
        if self.cfg.labels == HAS_PTX:
            kept = rows.filter(pc.is_valid(rows["has_ptx"]))
            labels = pc.cast(kept["has_ptx"], pa.int64())
        else:
            table = self._label_table()
            kept = rows.filter(pc.is_in(rows["key"], value_set=pa.array(list(table))))
            labels = pa.array([table[k] for k in kept["key"].to_pylist()], pa.int64())
        if kept.num_rows < rows.num_rows:
            log.warning(
                "%d %s rows have no label in %s: left out",
                rows.num_rows - kept.num_rows,
                "training" if train else "validation",
                self.cfg.labels,
            )
        return kept.append_column("label", labels)

    def _label_table(self) -> dict[str, int]:
        if self._table is None:
            self._table = read_label_table(self.cfg.labels)
            text = "".join(f"{k}\t{v}\n" for k, v in sorted(self._table.items()))
            self._table_fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._table

    def fingerprints(self) -> dict[str, str]:
        return {} if self.cfg.labels == HAS_PTX else {"labels": self._table_fingerprint}

    def use_rows(self, train: pa.Table, val: pa.Table) -> None:
        label_of: dict[str, int] = {}
        for rows in (train, val):
            for key, label in zip(rows["key"].to_pylist(), rows["label"].to_pylist(), strict=True):
                if label_of.setdefault(key, label) != label:
                    raise ConfigError(f"key {key!r} has two labels ({label_of[key]}, {label})")
        self.label_of = label_of
        self.num_classes = max(2, max(label_of.values()) + 1)
        if self.cfg.pos_rate() is not None and set(label_of.values()) - {0, 1}:
            raise ConfigError(
                f"--balance {self.cfg.balance}: the labels have {self.num_classes} classes, "
                "a positive rate needs two (0, 1); use --balance classes"
            )

    def pos_rate(self) -> tuple[float, float] | None:
        return self.cfg.pos_rate()

    def pools(self, rows: pa.Table) -> dict[str, list[stream.Entry]]:
        """The classes of the stream: one per label (``classes``), positives and negatives
        (``pos-rate``), or all rows together (``none``)."""
        entries = stream.entries_from_table(rows)
        if self.cfg.balance == "none":
            return {stream.ALL: entries}
        by_label: dict[int, list[stream.Entry]] = {}
        for entry in entries:
            by_label.setdefault(self.label_of[entry.key], []).append(entry)
        if len(by_label) < 2:
            return {stream.ALL: entries}
        if self.cfg.pos_rate() is not None:
            return {stream.POS: by_label[1], stream.NEG: by_label[0]}
        return {f"class{label:06d}": pool for label, pool in sorted(by_label.items())}

    # --- the model and its optimizer

    def model_args(self) -> dict[str, Any]:
        return classifier_args(self.cfg.arch, self.cfg.in_channels, self.num_classes)

    def build_model(self) -> torch.nn.Module:
        return build_classifier(self.cfg.arch, self.cfg.in_channels, self.num_classes)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.cfg.lr)
        return torch.optim.SGD(model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=self.cfg.plateau_factor,
            patience=self.cfg.plateau_patience,
        )

    # --- the step and the validation

    def labels(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        return torch.tensor([self.label_of[k] for k in batch["key"]], device=device)

    def loss(self, job: Job, batch: dict[str, Any]) -> torch.Tensor:
        logits = job.net(images_to(job.device, batch["image"]))
        return F.cross_entropy(logits.float(), self.labels(batch, job.device))

    def validate(self, job: Job, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """This rank's labels, class probabilities and summed loss."""
        labels, probs, loss_sum = [], [], 0.0
        for batch in batches:
            logits = job.model(images_to(job.device, batch["image"])).float()
            target = self.labels(batch, job.device)
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            labels.append(target.cpu().numpy())
            probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        return {"labels": labels, "probs": probs, "loss_sum": loss_sum}

    def summarise(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The figures over every rank's images; the loss is their mean (all ranks)."""
        labels = np.concatenate([a for p in parts for a in p["labels"]] or [np.zeros(0, int)])
        probs = [a for p in parts for a in p["probs"]]
        stacked = np.concatenate(probs) if probs else np.zeros((0, self.num_classes))
        out = classification_summary(labels, stacked)
        n = len(labels)
        out["loss"] = sum(p["loss_sum"] for p in parts) / n if n else float("nan")
        return out


def read_label_table(url: str) -> dict[str, int]:
    """``key -> label`` of a Parquet label table: a file, a folder of parts, or ``s3://``
    (an object, or a prefix of parts). Rows with a null label are left out.

    Raises:
        ConfigError: missing columns, a non-integer or negative label, a key given twice.
        StoreError: it cannot be read.
    """
    table = _read_parquet(url)
    missing = {"key", "label"} - set(table.column_names)
    if missing:
        raise ConfigError(
            f"label table {url} has no column(s) {sorted(missing)} (needs key, label)"
        )
    if not pa.types.is_integer(table.schema.field("label").type):
        raise ConfigError(
            f"label table {url}: label is {table.schema.field('label').type}, not int"
        )
    table = table.filter(pc.is_valid(table["label"]))
    keys = [str(k) for k in table["key"].to_pylist()]
    labels = table["label"].to_pylist()
    out: dict[str, int] = {}
    for key, label in zip(keys, labels, strict=True):
        if label < 0:
            raise ConfigError(f"label table {url}: key {key!r} has a negative label {label}")
        if key in out:
            raise ConfigError(f"label table {url}: key {key!r} is given twice")
        out[key] = int(label)
    if not out:
        raise ConfigError(f"label table {url} has no labelled rows")
    return out


def _read_parquet(url: str) -> pa.Table:
    try:
        if not is_s3_url(url):
            return pq.read_table(Path(url).expanduser(), columns=None)
        store = open_store(url, create=False)
        parts = [p for p in store.list() if p.endswith(".parquet")]
        blobs = [store.get(p) for p in parts] if parts else [read_url(url)]
        return pa.concat_tables(
            [pq.read_table(io.BytesIO(b)) for b in blobs], promote_options="default"
        )
    except (OSError, pa.ArrowInvalid) as e:
        raise StoreError(f"cannot read label table {url}: {e}") from e
