"""Stage functions: each turns a stage's settings into one library config and one call.

The libraries do the work (``pneumo.training.segment``, ``pneumo.training.classify``,
``pneumo.training.autoencode``, ``pneumo.pseudolabels.embed``,
``pneumo.pseudolabels.cluster``, ``pneumo.evaluation``); a stage function only places the
output in the stage's folder, wires its inputs (the classifier a U-Net starts from, the
label table a classifier learns) and returns a small JSON-able result for ``done.json``.
Training stages resume from their last checkpoint when the folder holds one
(``resume="auto"``: an interrupted attempt); the others simply run again.

Library modules are imported when a stage runs, so an experiment that does not use an arm
does not need its code.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from pneumo.experiment.stages import StageContext, StageFunction
from pneumo.shards import manifest
from pneumo.shards.audit import audit, held_out_overlap
from pneumo.shards.errors import ConfigError, PneumoError
from pneumo.shards.selections import HELD_OUT
from pneumo.shards.store import open_store, read_url

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings"  # the embed stage's Parquet dataset, inside its folder
LABELS = "labels"  # the cluster stage's label table, inside its folder
PER_IMAGE = "per_image.parquet"  # an evaluation's per-image results, inside its folder


def library_config(cls: type, **values: Any) -> Any:
    """``cls(**values)``, naming any setting the library config does not take.

    The recipe's names are the experiment's; when a library renames a field this says which,
    instead of a TypeError deep in a stage.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{cls.__module__}.{cls.__name__} takes no {', '.join(unknown)}: the recipe and "
            "the library disagree (update experiment/adapters.py)"
        )
    return cls(**values)


def _clean(result: dict[str, Any]) -> dict[str, Any]:
    """JSON-able with NaN as null (done.json is strict JSON)."""
    text = json.dumps(result, default=str)
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in json.loads(text).items()
    }


# ---------------------------------------------------------------- audit


def run_audit(ctx: StageContext) -> dict[str, Any]:
    """Refuse to go on if any patient is in two splits, or if a training selection shares a
    patient with the SIIM val/test rows; record the counts."""
    from pneumo.training.data import select

    rows = select(ctx.dataset, None)
    found = manifest.fingerprint(rows)
    if found != ctx.stage.settings["dataset_fingerprint"]:
        raise ConfigError(
            f"{ctx.dataset} changed since this experiment was planned ({found}, planned "
            f"{ctx.stage.settings['dataset_fingerprint']}): run the command again"
        )
    report = audit(rows)
    if not report.ok:
        pairs = ", ".join(f"{a} & {b}: {n}" for (a, b), n in sorted(report.pairs.items()))
        raise ConfigError(
            f"{report.overlapping_patients} patients of {ctx.dataset} are in more than one "
            f"split ({pairs}); the arms would be scored on patients they trained on. "
            "`pneumo audit DATASET` lists them; re-ingest with patient-level splits"
        )
    held = select(ctx.dataset, HELD_OUT)
    selections = {}
    for name, where in ctx.stage.settings["trained_on"].items():
        chosen = select(ctx.dataset, where)
        shared = held_out_overlap(chosen, held)
        if shared:
            raise ConfigError(
                f"[data] {name} ({where!r}) shares {len(shared)} patients with the SIIM "
                f"val/test rows ({HELD_OUT}): pretraining on them leaks the test set"
            )
        patients = len(set(chosen.column("patient_key").to_pylist()))
        selections[name] = {"where": where, "images": chosen.num_rows, "patients": patients}
    if report.image_level_images:
        log.warning(
            "%d images have image-level patient keys (DICOMs without a PatientID, or older SIIM "
            "rows without --nih-xref): their "
            "patients may have other images in other splits",
            report.image_level_images,
        )
    held_patients = sorted(set(held.column("patient_key").to_pylist()) - {None})
    result = {
        **report.to_dict(),
        "dataset_fingerprint": found,
        "images": rows.num_rows,
        "held_out": {"where": HELD_OUT, "images": held.num_rows},
        "held_out_patients": len(held_patients),
        "selections": selections,
    }
    open_store(ctx.url).put("audit.json", (json.dumps(result, indent=2) + "\n").encode())
    return result


# ---------------------------------------------------------------- segmentation


def segment_config(ctx: StageContext) -> Any:
    """The SegmentConfig of a segment stage: its settings, its folder, its encoder."""
    from pneumo.training.segment import SegmentConfig

    s = dict(ctx.stage.settings)
    s["pos_rate"] = tuple(s["pos_rate"]) if s["pos_rate"] is not None else None
    encoder = ctx.input_urls.get("encoder")  # a classify RUN: its best checkpoint
    if encoder is not None and ctx.inputs["encoder"].get("file"):  # a weights stage
        encoder = f"{encoder}/{ctx.inputs['encoder']['file']}"
    return library_config(
        SegmentConfig,
        dataset=ctx.dataset,
        out=ctx.url,
        encoder_init=encoder,
        resume="auto",
        **s,
    )


def run_segment(ctx: StageContext) -> dict[str, Any]:
    from pneumo.training.segment import train_segment

    summary = train_segment(segment_config(ctx), progress=ctx.progress)
    return _clean({**summary, "run": ctx.url})


def run_evaluate(ctx: StageContext) -> dict[str, Any]:
    """Score the input run on SIIM test; keep the per-image results in this stage's folder
    (the run's own ``eval/`` is shared by every evaluation of that run)."""
    from pneumo.evaluation.evaluate import EvaluateConfig, evaluate_segment

    s = ctx.stage.settings
    cfg = library_config(
        EvaluateConfig,
        run=ctx.input_urls["run"],
        dataset=ctx.dataset,
        split=s["split"],
        where=s["where"],
        tta=s["tta"],
        batch_size=s["batch_size"],
        workers=s["workers"],
    )
    summary = evaluate_segment(cfg, progress=ctx.progress)
    run, here = open_store(cfg.run), open_store(ctx.url)
    here.put(PER_IMAGE, run.get(f"eval/{cfg.split}.parquet"))
    return _clean({**summary, "per_image": PER_IMAGE})


# ---------------------------------------------------------------- ImageNet weights


def check_imagenet_weights(source: str, in_channels: int) -> str:
    """The SHA-256 of ``source``'s bytes (what ``sha256sum`` prints), after checking that
    it is a ResNet-34 state dict that fills a U-Net's ResNet-34 encoder.

    Raises:
        ConfigError: unreadable, not a state dict, or not a ResNet-34's (names the keys).
    """
    from pneumo.training.model import build_unet, load_encoder_state, strip_state_dict
    from pneumo.training.transfer import read_weights

    option = f"--imagenet-weights {source}"
    try:
        data = read_url(source)
    except PneumoError as e:
        raise ConfigError(f"{option}: {e}") from e
    try:
        weights = read_weights(source)
        encoder = build_unet(in_channels, "resnet34").encoder
        load_encoder_state(encoder, strip_state_dict(weights.state, source), source)
    except PneumoError as e:
        raise ConfigError(
            f"{option}: not a usable ResNet-34 state dict ({e}); give torchvision's "
            "resnet34-b627a593.pth or timm's resnet34 weights"
        ) from e
    sha256 = hashlib.sha256(data).hexdigest()
    # torch.hub's convention: a file named NAME-<first 8 hex digits of its SHA-256>.pth
    named = re.search(r"-([0-9a-f]{8})\.pth$", source)
    if named and not sha256.startswith(named.group(1)):
        raise ConfigError(
            f"{option}: its name says its SHA-256 starts with {named.group(1)}, but it is "
            f"{sha256}: a damaged or partial download? Download it again"
        )
    log.info("ImageNet weights %s: sha256 %s", source, sha256)
    return sha256


def run_weights(ctx: StageContext, *, source: str | None) -> dict[str, Any]:
    """Copy the user's weights file into this stage's folder, checking its SHA-256 (the
    stage's name) against the file now: a file changed since planning is refused."""
    s = ctx.stage.settings
    if source is None:
        raise ConfigError("the imagenet arm needs --imagenet-weights FILE")
    data = read_url(source)
    found = hashlib.sha256(data).hexdigest()
    if found != s["sha256"]:
        raise ConfigError(
            f"--imagenet-weights {source} changed since this experiment was planned "
            f"(sha256 {found}, planned {s['sha256']}): run the command again"
        )
    open_store(ctx.url).put(s["file"], data)
    log.info("ImageNet weights %s: sha256 %s", source, found)
    return {"sha256": found, "source": source, "file": s["file"], "bytes": len(data)}


# ---------------------------------------------------------------- pretraining


def run_classify(ctx: StageContext) -> dict[str, Any]:
    """Train the ResNet-34 classifier (NIH labels, or the cluster stage's label table)."""
    from pneumo.training.classify import ClassifyConfig, train_classify

    s = dict(ctx.stage.settings)
    s["arch"] = s.pop("encoder")  # the classifier is the ResNet the U-Net's encoder is
    labels = s.pop("labels")
    if labels == "table":
        labels = f"{ctx.input_urls['labels']}/{LABELS}"
    cfg = library_config(
        ClassifyConfig,
        dataset=ctx.dataset,
        out=ctx.url,
        labels=labels,
        resume="auto",
        **s,
    )
    return _clean({**train_classify(cfg, progress=ctx.progress), "run": ctx.url})


def run_evaluate_classify(ctx: StageContext) -> dict[str, Any]:
    """AUROC, accuracy, balanced accuracy and the majority share on NIH test."""
    from pneumo.evaluation.classify import EvaluateClassifyConfig, evaluate_classify

    # The run's own labels are scored: has_ptx, or the cluster stage's table it trained on.
    cfg = library_config(
        EvaluateClassifyConfig,
        run=ctx.input_urls["run"],
        dataset=ctx.dataset,
        **ctx.stage.settings,
    )
    return _clean(evaluate_classify(cfg, progress=ctx.progress))


def run_autoencode(ctx: StageContext) -> dict[str, Any]:
    from pneumo.training.autoencode import AutoencodeConfig, train_autoencode

    cfg = library_config(
        AutoencodeConfig, dataset=ctx.dataset, out=ctx.url, resume="auto", **ctx.stage.settings
    )
    return _clean({**train_autoencode(cfg, progress=ctx.progress), "run": ctx.url})


def run_embed(ctx: StageContext) -> dict[str, Any]:
    from pneumo.pseudolabels.embed import EmbedConfig, embed

    cfg = library_config(
        EmbedConfig,
        run=ctx.input_urls["run"],
        dataset=ctx.dataset,
        out=f"{ctx.url}/{EMBEDDINGS}",
        **ctx.stage.settings,
    )
    return _clean(embed(cfg, progress=ctx.progress))


def run_cluster(ctx: StageContext) -> dict[str, Any]:
    from pneumo.pseudolabels.cluster import ClusterConfig, cluster

    cfg = library_config(
        ClusterConfig,
        embeddings=f"{ctx.input_urls['embeddings']}/{EMBEDDINGS}",
        out=f"{ctx.url}/{LABELS}",
        **ctx.stage.settings,
    )
    return _clean(cluster(cfg, progress=ctx.progress))


def reconstructions(
    dataset: str, where: str, runs: Mapping[str, str], n: int = 8
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Figure 1's pixels: the first ``n`` images of ``where`` (by key) in [0, 1], and their
    reconstruction by each autoencoder's best weights (``runs``: kind -> RUN)."""
    import torch

    from pneumo.shards.stream import entries_from_table
    from pneumo.training.autoencoders import build_autoencoder
    from pneumo.training.checkpoint import load_checkpoint
    from pneumo.training.data import LoaderConfig, eval_batches, select
    from pneumo.training.runs import as_float

    models = {}
    for kind, url in runs.items():
        ckpt = load_checkpoint(url, "best")
        models[kind] = build_autoencoder(ckpt["model_args"])
        models[kind].load_state_dict(ckpt["model"])
        models[kind].eval()
    size = next(iter(models.values())).size  # one recipe setting: the same for both
    entries = entries_from_table(select(dataset, where).sort_by("key").slice(0, n))
    loader = LoaderConfig(dataset=dataset, size=size, batch_size=n, workers=0, augment=False)
    batch = next(iter(eval_batches(loader, rank=0, world_size=1, entries=entries)))
    images = as_float(batch["image"])
    with torch.no_grad():
        out = {k: torch.sigmoid(m(images)[0].float())[:, 0].numpy() for k, m in models.items()}
    return images[:, 0].numpy(), out


def stage_functions(imagenet_weights: str | None = None) -> dict[str, StageFunction]:
    """The stage functions, the ``weights`` stage reading ``imagenet_weights``."""
    return {**STAGE_FUNCTIONS, "weights": functools.partial(run_weights, source=imagenet_weights)}


STAGE_FUNCTIONS: dict[str, StageFunction] = {
    "audit": run_audit,
    "classify": run_classify,
    "evaluate-classify": run_evaluate_classify,
    "autoencode": run_autoencode,
    "embed": run_embed,
    "cluster": run_cluster,
    "segment": run_segment,
    "evaluate": run_evaluate,
    "weights": functools.partial(run_weights, source=None),  # stage_functions names the file
}
