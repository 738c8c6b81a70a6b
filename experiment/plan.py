"""The experiment as a graph of stages: which stage reads what, with which settings.

Arms (the report's Table 1 rows, plus one):

- ``none``: the U-Net with a randomly initialised encoder;
- ``labels``: the encoder is the trunk of a ResNet-34 classifier pretrained to find
  pneumothorax in NIH train (patients of the SIIM val/test images excluded by the splits);
- ``pseudo``: the encoder is the trunk of a classifier pretrained on pseudo-labels: an AE
  and a beta-VAE learn NIH train without labels, one's latent codes are clustered (PCA +
  DBSCAN, 14 clusters) and the clusters are the classes;
- ``leaky`` (opt-in): as ``labels``, but NIH pretraining also sees the NIH images of the
  SIIM val/test patients — what a pipeline that ignores that SIIM images are NIH images
  does. Its Dice minus the ``labels`` arm's is the measured effect of the leak;
- ``imagenet`` (opt-in): the encoder starts from a torchvision or timm ResNet-34 ImageNet
  state dict the user names (``--imagenet-weights``). A ``weights`` stage, named by the
  file's SHA-256, copies it into the experiment; nothing is fetched.

Every arm and seed then trains the same segmentation (same settings, same budget; only the
encoder's initial weights differ) and is scored on the SIIM test split, once per label
fraction: a share of the SIIM training patients (``[experiment] label_fractions``; nested
subsets, :func:`pneumo.shards.selections.patient_subset`); validation and test rows are the
same at every fraction. At fraction 1 a segment stage's settings are those of an experiment
without a sweep, so its hash (and folder) are too. One pretraining per arm is shared by the
segmentation seeds and fractions. Every stage reads the ``audit`` stage, whose hash covers
the dataset's content: new data means new stages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pneumo.experiment.recipe import Recipe
from pneumo.experiment.stages import Stage
from pneumo.shards import selections
from pneumo.shards.errors import ConfigError

EMBED_WHERE = "dataset == 'nih'"  # every NIH image gets a code; PCA/DBSCAN fit on train only
IMAGENET_ARCH = "resnet34"  # the imagenet arm's weights: a ResNet-34 state dict
IMAGENET_FILE = "resnet34.pth"  # the weights stage's copy, inside its folder


@dataclass(kw_only=True)
class FractionRuns:
    """The segmentation runs and their evaluations at one label fraction."""

    segments: dict[tuple[str, int], Stage] = field(default_factory=dict)  # (arm, seed) ->
    evaluations: dict[tuple[str, int], Stage] = field(default_factory=dict)


@dataclass(kw_only=True)
class Plan:
    """The stages of one experiment, by role, and all of them in a runnable order.

    ``segments`` and ``evaluations`` are those of the largest label fraction (Table 1's
    main columns); ``sweep`` holds every fraction's, the largest included.
    """

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    audit: Stage
    fractions: tuple[float, ...] = (1.0,)  # ascending
    weights: Stage | None = None  # the imagenet arm's weights file
    encoders: dict[str, Stage] = field(default_factory=dict)  # arm -> its pretraining
    classifier_evals: dict[str, Stage] = field(default_factory=dict)  # arm -> its evaluation
    autoencoders: dict[str, Stage] = field(default_factory=dict)  # "ae"/"vae" -> its run
    cluster: Stage | None = None
    segments: dict[tuple[str, int], Stage] = field(default_factory=dict)
    evaluations: dict[tuple[str, int], Stage] = field(default_factory=dict)
    sweep: dict[float, FractionRuns] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)

    @property
    def main_fraction(self) -> float:
        return self.fractions[-1]


def build_plan(
    recipe: Recipe,
    *,
    arms: tuple[str, ...],
    seeds: int,
    dataset_fingerprint: str,
    held_out_patients: list[str],
    fractions: tuple[float, ...] | None = None,
    imagenet_sha256: str | None = None,
) -> Plan:
    """The stages for ``arms`` x ``seeds`` x ``fractions`` under ``recipe``.

    Args:
        recipe: the validated recipe.
        arms: the arms to run (``none`` is always added: every difference is taken to it).
        seeds: segmentation seeds per arm (0 .. seeds-1).
        dataset_fingerprint: names the dataset's content (``pneumo.shards.manifest.fingerprint``).
        held_out_patients: patient keys of the SIIM val/test rows (the ``leaky`` arm adds
            their NIH images to pretraining).
        fractions: label fractions (shares of the SIIM training patients); None: the
            recipe's ``label_fractions``.
        imagenet_sha256: SHA-256 of the ``imagenet`` arm's weights file (required by it).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: at least one seed")
    arms = ("none", *[a for a in arms if a != "none"])
    data = recipe.data
    audit = Stage(
        kind="audit",
        label="audit splits",
        settings={"dataset_fingerprint": dataset_fingerprint, "trained_on": _trained_on(recipe)},
    )
    chosen = recipe.experiment.label_fractions if fractions is None else fractions
    plan = Plan(
        arms=arms, seeds=tuple(range(seeds)), audit=audit, fractions=checked_fractions(chosen)
    )
    if "labels" in arms:
        _classifier(plan, recipe, "labels", data.nih_train, data.nih_val, allow_overlap=False)
    if "leaky" in arms:
        # Validated like labels, on NIH val: the rows of SIIM val patients there are now
        # also trained on, as they would be in the pipeline this arm stands for.
        held = _key_list(held_out_patients)
        leaky_where = f"({data.nih_train}) or (dataset == 'nih' and patient_key in {held})"
        _classifier(plan, recipe, "leaky", leaky_where, data.nih_val, allow_overlap=True)
    if "pseudo" in arms:
        _pseudo(plan, recipe)
    if "imagenet" in arms:
        _imagenet(plan, recipe, imagenet_sha256)
    for fraction in plan.fractions:
        plan.sweep[fraction] = FractionRuns()
        for arm in arms:
            for seed in plan.seeds:
                _segment(plan, recipe, arm, seed, fraction)
    plan.segments = plan.sweep[plan.main_fraction].segments
    plan.evaluations = plan.sweep[plan.main_fraction].evaluations
    plan.stages[:] = _ordered(plan)
    return plan


def checked_fractions(fractions: tuple[float, ...]) -> tuple[float, ...]:
    """The label fractions, ascending, each in (0, 1] and named once."""
    values = tuple(float(f) for f in fractions)
    bad = [f for f in values if not 0 < f <= 1]
    if not values or bad or len(set(values)) != len(values):
        raise ConfigError(
            f"--label-fractions {','.join(map(str, fractions))}: give distinct fractions of "
            "the training patients in (0, 1], like 0.01,0.1,1.0"
        )
    return tuple(sorted(values))


def fraction_text(fraction: float) -> str:
    """``0.1`` -> ``10%`` (the percentage of training patients)."""
    return f"{100 * fraction:g}%"


def _trained_on(recipe: Recipe) -> dict[str, str]:
    """The selections that train weights, checked against the SIIM val/test patients.

    Validation selections are not: with patient-level splits shared by SIIM and NIH, NIH
    val holds the NIH images of SIIM val patients, and both only choose checkpoints.
    """
    return {"siim_train": recipe.data.siim_train, "nih_train": recipe.data.nih_train}


def _key_list(keys: list[str]) -> str:
    """A ``--where`` list literal of patient keys (hex digests: nothing to escape)."""
    if any(not k.replace("-", "").replace("_", "").isalnum() for k in keys):
        raise ConfigError("patient keys must be plain hex names to be listed in a selection")
    return "[" + ", ".join(f"'{k}'" for k in sorted(keys)) + "]"


def _settings(obj: Any, *drop: str) -> dict[str, Any]:
    values = asdict(obj)
    for name in drop:
        values.pop(name)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _classifier(
    plan: Plan,
    recipe: Recipe,
    arm: str,
    where: str,
    val_where: str,
    *,
    allow_overlap: bool,
    labels: Stage | None = None,
) -> None:
    """A classify stage (and its evaluation on NIH test) whose trunk initialises ``arm``."""
    settings = recipe.pseudo_classify if labels is not None else recipe.classify
    run = Stage(
        kind="classify",
        label=f"classify {arm}",
        settings={
            **_settings(settings),
            "where": where,
            "val_where": val_where,
            "labels": "table" if labels is not None else "has_ptx",
            "allow_overlap": allow_overlap,
            "seed": recipe.experiment.pretrain_seed,
            "in_channels": recipe.segment.in_channels,
            "encoder": recipe.segment.encoder,
        },
        inputs=(("data", plan.audit),) + ((("labels", labels),) if labels is not None else ()),
    )
    evaluation = Stage(
        kind="evaluate-classify",
        label=f"evaluate classify {arm}",
        settings={
            "where": recipe.data.nih_test,
            "split": "test",
            "batch_size": settings.batch_size,
            "workers": settings.workers,
        },
        inputs=(("run", run),),  # scored on the labels it trained on
    )
    plan.encoders[arm] = run
    plan.classifier_evals[arm] = evaluation


def _pseudo(plan: Plan, recipe: Recipe) -> None:
    """AE and VAE on unlabelled NIH train -> embed -> cluster -> classify on the clusters."""
    data, ae = recipe.data, recipe.autoencode
    if recipe.embed.source not in ae.kinds:
        raise ConfigError(
            f"{recipe.source}: [embed] source = {recipe.embed.source!r} is not among "
            f"[autoencode] kinds {list(ae.kinds)}"
        )
    for kind in ae.kinds:
        plan.autoencoders[kind] = Stage(
            kind="autoencode",
            label=f"autoencode {kind}",
            settings={
                **_settings(ae, "kinds"),
                "kind": kind,
                "where": data.nih_train,
                "val_where": data.nih_val,
                "seed": recipe.experiment.pretrain_seed,
                "in_channels": recipe.segment.in_channels,
            },
            inputs=(("data", plan.audit),),
        )
    embed = Stage(
        kind="embed",
        label=f"embed with the {recipe.embed.source}",
        settings={**_settings(recipe.embed, "source"), "where": EMBED_WHERE},
        inputs=(("run", plan.autoencoders[recipe.embed.source]),),
    )
    cluster = Stage(
        kind="cluster",
        label="cluster",
        settings={
            **_settings(recipe.cluster),
            "fit_where": selections.TRAIN,
            "seed": recipe.experiment.pretrain_seed,
        },
        inputs=(("embeddings", embed),),
    )
    plan.cluster = cluster
    _classifier(
        plan, recipe, "pseudo", data.nih_train, data.nih_val, allow_overlap=False, labels=cluster
    )


def _imagenet(plan: Plan, recipe: Recipe, sha256: str | None) -> None:
    """The ``weights`` stage: the user's ImageNet ResNet-34 file, named by its SHA-256."""
    if sha256 is None:
        raise ConfigError("the imagenet arm needs --imagenet-weights FILE (a ResNet-34 state dict)")
    if recipe.segment.encoder != IMAGENET_ARCH:
        raise ConfigError(
            f"{recipe.source}: the imagenet arm loads ResNet-34 weights, but [segment] "
            f"encoder = {recipe.segment.encoder!r}: set it to {IMAGENET_ARCH!r}"
        )
    plan.weights = Stage(
        kind="weights",
        label="ImageNet weights",
        settings={"sha256": sha256, "arch": IMAGENET_ARCH, "file": IMAGENET_FILE},
    )
    plan.encoders["imagenet"] = plan.weights


def _segment(plan: Plan, recipe: Recipe, arm: str, seed: int, fraction: float) -> None:
    """The segmentation run of ``arm`` x ``seed`` on ``fraction`` of the training patients,
    and its evaluation on SIIM test (the same test rows at every fraction)."""
    inputs: tuple[tuple[str, Stage], ...] = (("data", plan.audit),)
    if arm != "none":
        inputs += (("encoder", plan.encoders[arm]),)
    settings = {
        **_settings(recipe.segment),
        "where": recipe.data.siim_train,
        "val_where": recipe.data.siim_val,
        "seed": seed,
    }
    at = ""
    if fraction != 1:  # at 1 the settings (and so the hash) of an experiment without a sweep
        settings["train_fraction"] = fraction
        at = f", {fraction_text(fraction)} of patients"
    run = Stage(
        kind="segment", label=f"segment {arm} seed {seed}{at}", settings=settings, inputs=inputs
    )
    evaluation = Stage(
        kind="evaluate",
        label=f"evaluate {arm} seed {seed}{at}",
        settings={**_settings(recipe.evaluate), "split": "test", "where": recipe.data.siim_test},
        inputs=(("run", run),),
    )
    plan.sweep[fraction].segments[(arm, seed)] = run
    plan.sweep[fraction].evaluations[(arm, seed)] = evaluation


def _ordered(plan: Plan) -> list[Stage]:
    """Every stage after its inputs: pretraining first, then the arms seed by seed (so a
    first full row of Table 1 exists early), each segmentation followed by its evaluation;
    the largest label fraction first (Table 1's main columns), then the smaller ones."""
    roots = [*plan.classifier_evals.values()]
    for fraction in sorted(plan.sweep, reverse=True):
        for seed in plan.seeds:
            for arm in plan.arms:
                roots.append(plan.sweep[fraction].evaluations[(arm, seed)])
    out: list[Stage] = []
    seen: set[str] = set()

    def visit(stage: Stage) -> None:
        if stage.name in seen:
            return
        for _, upstream in stage.inputs:
            visit(upstream)
        seen.add(stage.name)
        out.append(stage)

    for kind in sorted(plan.autoencoders):  # both autoencoders, even the one not clustered
        visit(plan.autoencoders[kind])
    for root in roots:
        visit(root)
    return out
