"""A small trained segmentation run on synthetic SIIM data, shared by the evaluation tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.synthetic.archives import write_siim_demo
from pneumo.training.segment import SegmentConfig, train_segment


@dataclass(frozen=True)
class TrainedRun:
    dicoms: Path  # the demo's DICOM tree (every image of the dataset)
    labels: Path  # the demo's stage-1 style label CSV (the ground-truth RLE)
    dataset: str
    run: str
    config: SegmentConfig


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """80 demo images (40/20/20 split) and a ResNet-18 U-Net trained 24 steps at 64 px.

    The model is weak (seconds of CPU): the evaluation tests check the bookkeeping, not it.
    """
    root = tmp_path_factory.mktemp("evaluation")
    src = write_siim_demo(root / "src", n=80, size=128, seed=1)
    dataset = str(root / "dataset")
    batch = BatchConfig(out=dataset, split_fractions=(0.5, 0.25, 0.25))
    ingest_siim(SiimConfig(dicom_root=str(src.image_root), labels=src.labels_csv, batch=batch))
    cfg = SegmentConfig(
        dataset=dataset,
        out=str(root / "run"),
        size=64,
        batch_size=8,
        epochs=3,
        steps_per_epoch=8,
        workers=0,
        warmup_steps=2,
        lr=1e-3,
        encoder="resnet18",
    )
    train_segment(cfg)
    return TrainedRun(
        dicoms=src.image_root, labels=src.labels_csv, dataset=dataset, run=cfg.out, config=cfg
    )
