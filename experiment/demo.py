"""The demo's dataset: synthetic NIH and SIIM data in one DATASET, split by patient.

As in the real data sets, every SIIM image is an NIH image
(``pneumo.synthetic.archives.write_demo_pair``) and only the cross-reference file says
which; ingesting NIH with its split lists and then SIIM through the cross-reference gives
every patient one split in both datasets, which the experiment's audit stage checks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pneumo.ingest.batch import BatchConfig, BatchSummary
from pneumo.ingest.nih import NihConfig, ingest_nih
from pneumo.ingest.patients import PatientSecret
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards.errors import ConfigError
from pneumo.synthetic.archives import DEMO_PATIENT_SECRET, DemoPair, write_demo_pair

log = logging.getLogger(__name__)

# NIH's official-style lists put 20% of patients in test; the rest go to train and val
# 70:15 (ingest rescales); SIIM images follow their NIH patients.
DEMO_FRACTIONS = (0.7, 0.15, 0.15)

Progress = Callable[[dict[str, object]], None]


@dataclass(frozen=True, kw_only=True)
class DemoDataConfig:
    """What the demo dataset is made of.

    Attributes:
        raw: local folder for the synthetic source files (DICOMs, PNGs, CSVs).
        dataset: the DATASET to ingest into (folder or s3://).
        n_nih, n_siim: images of each set; the SIIM images are drawn from the NIH ones.
        size: stored image side in pixels.
        seed: seed of the synthetic data.
        workers: ingest processes.
    """

    raw: Path
    dataset: str
    n_nih: int = 400
    n_siim: int = 200
    size: int = 256
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        if self.n_siim > self.n_nih:
            raise ConfigError(
                f"n_siim {self.n_siim} > n_nih {self.n_nih}: SIIM images are NIH images"
            )


@dataclass(frozen=True, kw_only=True)
class DemoData:
    pair: DemoPair
    nih: BatchSummary
    siim: BatchSummary


def make_demo_dataset(cfg: DemoDataConfig, progress: Progress | None = None) -> DemoData:
    """Write the synthetic sources and ingest NIH, then SIIM, into ``cfg.dataset``.

    Idempotent: the same config writes the same bytes, and a committed batch is found
    committed. ``progress`` gets ``{"phase": "write"|"ingest nih"|"ingest siim", "done",
    "total"}``.
    """

    def report(phase: str) -> Callable[..., None]:
        def call(done: int, total: int | None = None) -> None:
            if progress is not None:
                progress({"phase": phase, "done": done, "total": total})

        return call

    total = cfg.n_nih + cfg.n_siim
    pair = write_demo_pair(
        cfg.raw,
        n_nih=cfg.n_nih,
        n_siim=cfg.n_siim,
        seed=cfg.seed,
        size=cfg.size,
        progress=lambda done: report("write")(done, total),
    )

    # A fixed secret: the demo's patient keys (and so its splits) are the same anywhere.
    secret = PatientSecret(value=DEMO_PATIENT_SECRET, origin="the demo's fixed secret")
    lists = (pair.nih.out_dir / "train_val_list.txt", pair.nih.out_dir / "test_list.txt")

    def batch(**kw: object) -> BatchConfig:
        return BatchConfig(out=cfg.dataset, workers=cfg.workers, patient_secret=secret, **kw)

    nih = ingest_nih(
        NihConfig(
            image_root=str(pair.nih.image_root),
            labels=pair.nih.labels_csv,
            train_val_list=lists[0],
            test_list=lists[1],
            batch=batch(split_fractions=DEMO_FRACTIONS),
        ),
        progress=report("ingest nih"),
    )
    siim = ingest_siim(
        SiimConfig(
            dicom_root=str(pair.siim.image_root),
            labels=pair.siim.labels_csv,
            nih_xref=pair.xref,
            split_lists=lists,  # the same policy whichever set is ingested first
            batch=batch(split_fractions=DEMO_FRACTIONS),
        ),
        progress=report("ingest siim"),
    )
    log.info("demo dataset %s: nih %s, siim %s", cfg.dataset, nih.splits, siim.splits)
    return DemoData(pair=pair, nih=nih, siim=siim)
