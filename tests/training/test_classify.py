"""``train_classify`` on a learnable NIH stand-in: it beats the majority baseline, resumes,
balances N classes, steps its plateau schedule alike on every rank, refuses leaky
selections, and hands its trunk to the U-Net."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from nih_shards import nih_rows, write_nih
from ranks_helper import run_ranks

from pneumo.evaluation.classify import EvaluateClassifyConfig, evaluate_classify
from pneumo.shards import stream
from pneumo.shards.errors import ConfigError
from pneumo.training import loop
from pneumo.training.checkpoint import load_checkpoint, model_from_checkpoint, weights_sha256
from pneumo.training.classify import ClassifyConfig, ClassifyTask, read_label_table, train_classify
from pneumo.training.data import select, train_batches
from pneumo.training.job import Job
from pneumo.training.runs import images_to
from pneumo.training.segment import SegmentConfig, SegmentTask, train_segment


def small(dataset: str, out: Path | str, **changes: Any) -> ClassifyConfig:
    """Seconds on CPU: ResNet-18 at 64 px, 3 epochs of 6 steps of 8, Adam."""
    base: dict[str, Any] = dict(
        dataset=dataset,
        out=str(out),
        size=64,
        batch_size=8,
        epochs=3,
        steps_per_epoch=6,
        workers=0,
        arch="resnet18",
        optimizer="adam",
        lr=1e-3,
        checkpoint_every=4,
    )
    return ClassifyConfig(**{**base, **changes})


def metrics(run: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(nih_demo: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = small(nih_demo, tmp_path_factory.mktemp("classify") / "run")
    reports: list[dict[str, Any]] = []
    return {"cfg": cfg, "result": train_classify(cfg, progress=reports.append), "reports": reports}


@pytest.mark.slow
def test_a_short_run_beats_the_majority_baseline(trained: dict[str, Any], nih_demo: str) -> None:
    cfg, result = trained["cfg"], trained["result"]
    rows = metrics(cfg.out)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and result["step"] == 18
    val = select(nih_demo, cfg.val_where)
    positives = sum(val["has_ptx"].to_pylist())
    assert rows[-1]["val_majority_rate"] == pytest.approx(1 - positives / val.num_rows)
    assert rows[-1]["val_n_images"] == val.num_rows == 32
    # Always guessing the majority has AUROC 0.5.
    assert result["best_val_auroc"] > 0.85, rows

    last = load_checkpoint(cfg.out, "last")
    assert last["task"] == "classify" and last["best_metric"] == "val_auroc"
    assert last["model_args"] == {
        "arch": "classifier", "backbone": "resnet18", "in_channels": 1, "num_classes": 2,
    }  # fmt: skip
    assert last["init"] == [{"source": "random", "seed": 0}]
    assert "labels" not in last["fingerprints"]  # has_ptx: the labels are the rows'
    # A finished run cannot go on (--epochs is fixed): its last.pt is the weights alone.
    assert not {"optimizer", "scheduler", "rng"} & set(last)
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    assert config["leakage"]["overlap_patients"] == 0 and config["labels"] == "has_ptx"
    pinned = pq.read_table(Path(cfg.out) / "rows" / "train.parquet")
    assert pinned["label"].to_pylist() == [int(v) for v in pinned["has_ptx"].to_pylist()]
    drawn = {key for panel in ClassifyTask.panels for key, _ in panel.lines}
    assert drawn | set(ClassifyTask.headline) <= set(rows[-1])  # curves name real fields
    epochs = [r for r in trained["reports"] if r["event"] == "epoch"]
    assert [r["val_auroc"] for r in epochs] == [r["val_auroc"] for r in rows]

    summary = evaluate_classify(EvaluateClassifyConfig(run=cfg.out, split="test", workers=0))
    assert summary["n_images"] == 32 and summary["majority_rate"] == pytest.approx(0.75)
    assert summary["auroc"] > 0.85
    table = pq.read_table(Path(cfg.out) / "eval" / "test.parquet")
    assert table.num_rows == 32 and set(table["dataset"].to_pylist()) == {"nih"}
    assert (Path(cfg.out) / "eval" / "test-roc.png").read_bytes()[:4] == b"\x89PNG"


class Crash(Exception):
    pass


@pytest.mark.slow
def test_batchnorm_statistics_are_re_estimated_for_the_final_weights(
    nih_demo: str, tmp_path: Path
) -> None:
    """The checkpoint's BatchNorm statistics are the plain average over the epoch's first
    ``precise_bn`` training batches, taken with the final weights (not the running average
    of batches seen while the weights moved)."""
    cfg = small(nih_demo, tmp_path / "run", epochs=1, steps_per_epoch=4, precise_bn=3)
    train_classify(cfg)
    model = model_from_checkpoint(load_checkpoint(cfg.out, "last"))
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # Its input is the first convolution's output: no BatchNorm state shapes it.
    seen: list[torch.Tensor] = []
    first.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].double()))
    task = ClassifyTask(cfg)
    train = task.prepare_rows(select(nih_demo, cfg.where), train=True)
    task.use_rows(train, train)
    batches = train_batches(
        task.loader(train=True), rank=0, world_size=1, epoch=0, steps_per_epoch=4,
        total_steps=4, pools=task.pools(train),
    )  # fmt: skip
    with torch.no_grad():
        for batch in list(batches)[:3]:
            model(images_to(torch.device("cpu"), batch["image"]))
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen])
    variances = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x in seen])
    assert torch.allclose(first.running_mean.double(), means.mean(0), atol=1e-4)
    assert torch.allclose(first.running_var.double(), variances.mean(0), rtol=1e-3)


@pytest.mark.slow
def test_resume_continues_the_classifier(nih_demo: str, tmp_path: Path) -> None:
    cfg = small(nih_demo, tmp_path / "whole", epochs=2, steps_per_epoch=3, checkpoint_every=2)
    whole = train_classify(cfg)
    broken = replace(cfg, out=str(tmp_path / "broken"))

    def crash(report: dict[str, Any]) -> None:
        if report["event"] == "step" and report["step"] == 5:  # last.pt holds step 4
            raise Crash

    with pytest.raises(Crash):
        train_classify(broken, progress=crash)
    assert load_checkpoint(broken.out, "last")["step"] == 4
    resumed = train_classify(broken)
    assert resumed["step"] == 6
    for key in ("val_loss", "val_auroc", "val_accuracy"):
        assert resumed[key] == pytest.approx(whole[key]), key
    assert metrics(broken.out)[-1]["lr"] == metrics(cfg.out)[-1]["lr"]


@pytest.mark.slow
def test_encoder_init_from_a_classify_run_gives_the_unet_its_trunk(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    run = trained["cfg"].out
    classifier = load_checkpoint(run, "best")["model"]
    cfg = SegmentConfig(
        dataset=trained["cfg"].dataset, out=str(tmp_path / "seg"), encoder="resnet18",
        encoder_init=run, size=64,
    )  # fmt: skip
    task = SegmentTask(cfg)
    unet = task.build_model()
    chain = task.init_weights(unet)
    encoder = unet.encoder.state_dict()
    trunk = {k: v for k, v in classifier.items() if not k.startswith("fc.")}
    assert set(encoder) == set(trunk)
    for name, tensor in trunk.items():
        assert torch.equal(encoder[name], tensor), name
    best = str(Path(run, "checkpoints", "best.pt"))
    assert chain[0]["source"] == best and chain[0]["task"] == "classify"
    assert chain[0]["sha256"] == weights_sha256(classifier)
    assert chain[1:] == [{"source": "random", "seed": 0}]


@pytest.mark.slow
def test_a_segment_run_records_the_classifier_in_its_init_chain(
    trained: dict[str, Any], dataset, tmp_path: Path
) -> None:
    """``--resume auto`` on an empty RUN starts fresh and honours ``--encoder-init``."""
    run = trained["cfg"].out
    cfg = SegmentConfig(
        dataset=dataset.url, out=str(tmp_path / "seg"), encoder="resnet18", encoder_init=run,
        size=64, batch_size=4, epochs=1, steps_per_epoch=1, workers=0, pos_rate=None,
    )  # fmt: skip
    train_segment(cfg)
    chain = load_checkpoint(cfg.out, "best")["init"]
    assert chain[0]["source"] == str(Path(run, "checkpoints", "best.pt"))
    assert chain[0]["sha256"] == weights_sha256(load_checkpoint(run, "best")["model"])
    config = json.loads((tmp_path / "seg" / "config.json").read_text())
    assert config["init"] == chain


def test_class_balance_draws_every_class_equally_often(nih_demo: str, tmp_path: Path) -> None:
    """A label table of three classes, 40 / 16 / 8 training rows: each drawn about a third."""
    keys = select(nih_demo, "split == 'train'")["key"].to_pylist()
    labels = [0] * 40 + [1] * 16 + [2] * 8
    pq.write_table(pa.table({"key": keys, "label": labels}), tmp_path / "labels.parquet")
    cfg = small(nih_demo, tmp_path / "run", labels=str(tmp_path / "labels.parquet"))
    task = ClassifyTask(cfg)
    train = task.prepare_rows(select(nih_demo, cfg.where), train=True)
    task.use_rows(train, task.prepare_rows(select(nih_demo, cfg.val_where), train=False))
    assert task.num_classes == 3 and task.model_args()["num_classes"] == 3
    pools = task.pools(train)
    assert sorted(len(p) for p in pools.values()) == [8, 16, 40]
    batches = train_batches(
        task.loader(train=True), rank=0, world_size=1, epoch=0, steps_per_epoch=30,
        total_steps=30, pools=pools,
    )  # fmt: skip
    drawn = Counter(task.label_of[k] for b in batches for k in b["key"])
    assert sum(drawn.values()) == 240
    assert all(60 <= drawn[c] <= 100 for c in range(3)), drawn  # 80 expected; natural: 30
    natural = small(nih_demo, tmp_path / "run2", labels=cfg.labels, balance="none")
    assert list(ClassifyTask(natural).pools(train)) == [stream.ALL]


def test_label_tables_are_checked(nih_demo: str, tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": ["a", "a"], "label": [0, 1]}), path)
    with pytest.raises(ConfigError, match="'a' is given twice"):
        read_label_table(str(path))
    pq.write_table(pa.table({"key": ["a"], "cluster": [0]}), path)
    with pytest.raises(ConfigError, match=r"no column\(s\) \['label'\]"):
        read_label_table(str(path))
    pq.write_table(pa.table({"key": ["a", "b"], "label": [0.5, 1.0]}), path)
    with pytest.raises(ConfigError, match="not int"):
        read_label_table(str(path))
    pq.write_table(pa.table({"key": ["a", "b", "c"], "label": [3, None, 1]}), path)
    assert read_label_table(str(path)) == {"a": 3, "c": 1}
    cfg = small(nih_demo, tmp_path / "run", labels=str(path), balance="pos-rate:0.5")
    task = ClassifyTask(cfg)
    with pytest.raises(ConfigError, match="--balance classes"):
        task.use_rows(
            pa.table({"key": ["a", "c"], "label": [3, 1]}), pa.table({"key": [], "label": []})
        )


def test_per_rank_draws_differ(nih_demo: str, tmp_path: Path) -> None:
    """Each rank draws its own classes per batch (rank in the per-batch seed)."""
    cfg = small(nih_demo, tmp_path / "run", balance="pos-rate:0.5")
    task = ClassifyTask(cfg)
    train = task.prepare_rows(select(nih_demo, cfg.where), train=True)
    task.use_rows(train, train)
    drawn = [
        [
            [int(v) for v in b["has_ptx"]]
            for b in train_batches(
                task.loader(train=True),
                rank=rank,
                world_size=2,
                epoch=0,
                steps_per_epoch=4,
                total_steps=4,
                pools=task.pools(train),
            )  # fmt: skip
        ]
        for rank in (0, 1)
    ]
    assert drawn[0] != drawn[1]
    assert 8 <= sum(map(sum, drawn[0])) <= 24  # about half positive: the rate holds


def test_training_patients_in_siim_val_or_test_are_refused(tmp_path: Path, write_shards) -> None:
    root = tmp_path / "data"
    nih = nih_rows(24, split="train", start=0, pos_every=3) + nih_rows(
        8, split="val", start=24, pos_every=3
    )
    write_nih(root, write_shards, nih)
    # Three NIH training patients are also SIIM val/test patients (their SIIM copies).
    siim = [
        {
            "key": f"siim{i}", "image_id": f"1.2.{i}", "dataset": "siim", "has_ptx": False,
            "split": "val" if i % 2 else "test", "patient_key": f"patient{i:05d}",
            "content_sha256": f"{i:064x}",
        }
        for i in (0, 1, 2, 30)
    ]  # fmt: skip
    write_shards(root, siim, lambda row: {"png": b"", "json": b"{}"}, per_shard=8,
                 one_shard=False, batch="s0")  # fmt: skip
    cfg = small(str(root), tmp_path / "run", epochs=1, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="3 patient.*--allow-overlap") as err:
        train_classify(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
    train_classify(replace(cfg, allow_overlap=True))
    leakage = load_checkpoint(cfg.out, "last")["leakage"]
    assert leakage["allow_overlap"] and leakage["overlap_patients"] == 3
    assert leakage["held_out_patients"] == 4
    # patient 30 is an NIH val patient: 4 NIH patients are SIIM val/test patients.
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["leakage"]["nih_patients_excluded"] == 4


# ---------------------------------------------------------------- two ranks


class ScriptedPlateau(ClassifyTask):
    """Validation losses scripted per rank: rank 0's own mean falls by 0.2 every epoch, rank
    1's sum is whatever keeps the mean over all (one) validation image at exactly 1.0."""

    def validate(self, job: Job, batches: Any) -> dict[str, Any]:
        part = super().validate(job, batches)
        epoch = job.step // job.spe - 1
        n = sum(len(a) for a in part["labels"])
        rank0_mean = 1.0 - 0.2 * epoch
        if job.env.rank == 0:
            part["loss_sum"] = n * rank0_mean
        else:
            part["loss_sum"] = VAL_IMAGES * 1.0 - (VAL_IMAGES - n) * rank0_mean
        return part


def train_scripted(cfg: ClassifyConfig) -> None:
    loop.run(ScriptedPlateau(cfg))


VAL_IMAGES = 1


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, write_shards) -> ClassifyConfig:
    """Two gloo ranks and one val image: rank 0 validates one batch, rank 1 none (a rank
    validating through the DDP wrapper would wait on a buffer broadcast the other never
    joins). Plateau patience 1."""
    root = tmp_path_factory.mktemp("two-ranks")
    rows = nih_rows(16, split="train", start=0, pos_every=2) + nih_rows(
        VAL_IMAGES, split="val", start=16, pos_every=2
    )
    write_nih(root / "data", write_shards, rows)
    cfg = small(
        str(root / "data"), root / "run", batch_size=2, epochs=4, steps_per_epoch=2,
        plateau_patience=1, optimizer="sgd", lr=0.01,
    )  # fmt: skip
    run_ranks(train_scripted, cfg, world_size=2)
    return cfg


@pytest.mark.slow
def test_two_ranks_with_uneven_validation_shares(two_ranks: ClassifyConfig) -> None:
    rows = metrics(two_ranks.out)
    assert [r["batches_per_rank"] for r in rows] == [[2, 2]] * 4
    assert all(r["val_n_images"] == VAL_IMAGES for r in rows)  # once each, none twice
    assert [r["val_loss"] for r in rows] == pytest.approx([1.0] * 4)  # the script's stall


@pytest.mark.slow
def test_the_plateau_lowers_the_lr_on_every_rank_at_the_same_epoch(
    two_ranks: ClassifyConfig,
) -> None:
    """Patience 1: epochs 1 and 2 bring no lower loss of all ranks, so epoch 3 trains at a
    tenth of the rate on both ranks. A rank stepping on its own loss would not: rank 0's
    keeps falling."""
    lrs = [r["lr_per_rank"] for r in metrics(two_ranks.out)]
    assert all(a == b for a, b in lrs), lrs
    assert [a for a, _ in lrs] == pytest.approx([0.01, 0.01, 0.01, 0.001]), lrs
