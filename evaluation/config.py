"""The settings every evaluation shares (``evaluate segment``, ``evaluate classify``)."""

from __future__ import annotations

from dataclasses import dataclass

from pneumo.shards.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """What to evaluate; a task's evaluation subclasses it.

    Attributes:
        run: the RUN (folder or s3://) of a training.
        dataset: the DATASET to read; None: the one the run trained on.
        split: the split to score (``test``, ``val``, ``train``); names the outputs.
        where: manifest filter instead of the split's default selection.
        checkpoint: ``best``, ``last``, or the URL of a checkpoint file.
        workers: loader processes.
        batch_size: images per forward pass.
    """

    run: str
    dataset: str | None = None
    split: str = "test"
    where: str | None = None
    checkpoint: str = "best"
    workers: int = 2
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError("batch_size must be >= 1 and workers >= 0")
        if not self.split.replace("_", "").isalnum():
            raise ConfigError(f"split {self.split!r} must be a plain name (test, val, train)")
