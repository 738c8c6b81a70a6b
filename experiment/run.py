"""``pneumo experiment``: the report's comparison in one call, read top to bottom.

The flow of :func:`run_experiment`:

1. read the dataset's manifest: its fingerprint (every stage's hash depends on it) and the
   patients of the SIIM val/test rows (what the ``leaky`` arm adds to pretraining);
2. plan the stages (``pneumo.experiment.plan``) and check that every selection they use selects
   something, before any training starts;
3. run them in order under ``EXP/stages/`` (``pneumo.experiment.stages``): done stages are skipped,
   an interrupted one resumes;
4. from the evaluations: Table 1 with bootstrap intervals over test patients (joined from
   the manifest's ``patient_key``) and seeds (``pneumo.experiment.stats``), the pretraining table,
   Figures 1 and 2 and the pretraining figure, and ``report.md`` tying them together.

Every output is written through the store, so ``EXP`` may be a folder or ``s3://`` prefix.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.parquet as pq

from pneumo.experiment import adapters, figures, report, tables
from pneumo.experiment.executors import ExecutorConfig, run_stages
from pneumo.experiment.plan import Plan, build_plan, checked_fractions
from pneumo.experiment.recipe import ARMS, Recipe
from pneumo.experiment.stages import RESUME_MODES, StageRunner
from pneumo.shards import manifest
from pneumo.shards.errors import ConfigError
from pneumo.shards.selections import HELD_OUT
from pneumo.shards.store import Store, open_store
from pneumo.training import tracking

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]

TABLE1_MD = "table1.md"
TABLE1_CSV = "table1.csv"
PRETRAIN_MD = "pretraining.md"
PRETRAIN_CSV = "pretraining.csv"
FIGURE1 = "figure1_reconstructions.png"
FIGURE2 = "figure2_dice_curves.png"
FIGURE_PRETRAIN = "figure3_pretraining.png"
REPORT = "report.md"


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One experiment.

    Attributes:
        dataset: the DATASET (folder or s3://) holding SIIM and NIH, split by patient.
        out: EXP, where every stage and the tables, figures and report go.
        recipe: the stages' settings.
        seeds: segmentation seeds per arm; None: the recipe's.
        arms: the arms to compare; None: the recipe's (``none`` is always included).
        label_fractions: shares of the SIIM training patients each arm and seed trains on;
            None: the recipe's ``label_fractions``.
        imagenet_weights: the ``imagenet`` arm's torchvision/timm ResNet-34 state dict.
        resume: ``auto`` continues an interrupted stage from its checkpoint; ``never``
            restarts it from scratch. Finished stages are reused either way.
        command: the command line that started this, for the report.
        executor: where the stages run: one after another here (the default), several at
            once on this machine's devices or CPUs, or on a Ray cluster.
    """

    dataset: str
    out: str
    recipe: Recipe
    seeds: int | None = None
    arms: tuple[str, ...] | None = None
    label_fractions: tuple[float, ...] | None = None
    imagenet_weights: str | None = None
    resume: str = "auto"
    command: str = ""
    executor: ExecutorConfig = ExecutorConfig()

    def __post_init__(self) -> None:
        if self.seeds is not None and self.seeds < 1:
            raise ConfigError(f"--seeds {self.seeds}: at least one seed")
        bad = [a for a in self.arms or () if a not in ARMS]
        if bad:
            raise ConfigError(f"--arms: unknown {', '.join(bad)} (known: {', '.join(ARMS)})")
        if self.resume not in RESUME_MODES:
            raise ConfigError(f"--resume {self.resume!r}: use one of {', '.join(RESUME_MODES)}")
        if self.label_fractions is not None:
            object.__setattr__(self, "label_fractions", checked_fractions(self.label_fractions))
        if "imagenet" in self.arm_list and self.imagenet_weights is None:
            raise ConfigError(
                "the imagenet arm needs --imagenet-weights FILE: a torchvision or timm "
                "ResNet-34 state dict (see the README for where to get it)"
            )
        if self.imagenet_weights is not None and "imagenet" not in self.arm_list:
            raise ConfigError(
                f"--imagenet-weights {self.imagenet_weights} is only read by the imagenet "
                "arm: add imagenet to --arms"
            )

    @property
    def arm_list(self) -> tuple[str, ...]:
        chosen = self.arms or self.recipe.experiment.arms
        return ("none", *[a for a in ARMS if a in chosen and a != "none"])

    @property
    def seed_count(self) -> int:
        return self.seeds or self.recipe.experiment.seeds


def run_experiment(cfg: ExperimentConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or finish) the experiment; returns Table 1 and where everything was written.

    ``progress`` gets the stage runner's events (see ``pneumo.experiment.stages.StageRunner``).

    Raises:
        ConfigError: a selection selects nothing, the splits overlap, or a stage's
            settings are refused by its library.
    """
    started = time.time()
    plan = make_plan(cfg)
    exp = open_store(cfg.out)
    commands = _record_start(exp, cfg, plan)
    # With MLflow tracking on: the experiment's run, each stage's nested under it.
    with _tracked(exp, cfg, plan) as tracked, tracking.parent(tracked):
        runner = StageRunner(
            exp=cfg.out,
            dataset=cfg.dataset,
            functions=adapters.stage_functions(cfg.imagenet_weights),
            resume=cfg.resume,
            progress=progress,
        )
        run_stages(runner, plan.stages, cfg.executor)
        outputs = write_outputs(exp, cfg, plan, runner, commands)
        tracked.log_files(exp, [url.rsplit("/", 1)[-1] for url in outputs["files"]])
        for row in outputs["rows"]:
            tracked.log_metrics({f"table1.{row['arm']}.{k}": v for k, v in row.items()})
    log.info("experiment done in %.0f s: %s", time.time() - started, exp.url_of(REPORT))
    return outputs


def _tracked(exp: Store, cfg: ExperimentConfig, plan: Plan) -> tracking.Tracked:
    """The experiment's MLflow run (``EXP/tracking.json``: a rerun continues it); a no-op
    without tracking."""
    name = cfg.out.rstrip("/").rsplit("/", 1)[-1]
    fingerprint = plan.audit.settings.get("dataset_fingerprint")
    run = tracking.open_run(name=name, record=exp, tags={
        "pneumo.kind": "experiment", "pneumo.dataset": cfg.dataset,
        "pneumo.fingerprint.dataset": fingerprint, "pneumo.recipe": cfg.recipe.source,
    })  # fmt: skip
    recipe = {k: v for k, v in asdict(cfg.recipe).items() if k not in ("text", "source")}
    run.log_params({**recipe, "arms": plan.arms, "seeds": plan.seeds, "resume": cfg.resume})
    return run


def make_plan(cfg: ExperimentConfig) -> Plan:
    """The stages of ``cfg``, after checking every selection they use selects rows."""
    from pneumo.training.data import select

    rows = select(cfg.dataset, None)
    if rows.num_rows == 0:
        raise ConfigError(f"{cfg.dataset} holds no images")
    held = select(cfg.dataset, HELD_OUT)
    weights = cfg.imagenet_weights
    plan = build_plan(
        cfg.recipe,
        arms=cfg.arm_list,
        seeds=cfg.seed_count,
        dataset_fingerprint=manifest.fingerprint(rows),
        held_out_patients=sorted(set(held.column("patient_key").to_pylist()) - {None}),
        fractions=cfg.label_fractions,
        imagenet_sha256=(
            adapters.check_imagenet_weights(weights, cfg.recipe.segment.in_channels)
            if weights is not None
            else None
        ),
    )
    data = cfg.recipe.data
    needed = {"siim_train": data.siim_train, "siim_val": data.siim_val}
    needed["siim_test"] = data.siim_test
    if set(cfg.arm_list) - {"none"}:
        needed |= {"nih_train": data.nih_train, "nih_val": data.nih_val}
        needed["nih_test"] = data.nih_test
    for name, where in needed.items():
        if select(cfg.dataset, where).num_rows == 0:
            raise ConfigError(
                f"{cfg.recipe.source}: [data] {name} = {where!r} selects no rows in "
                f"{cfg.dataset}; the arms {', '.join(cfg.arm_list)} need it"
            )
    return plan


def _record_start(exp: Store, cfg: ExperimentConfig, plan: Plan) -> list[dict[str, str]]:
    """The recipe as given and the plan (stage names and labels), for the report."""
    exp.put("recipe.toml", cfg.recipe.text.encode())
    commands = json.loads(exp.get("commands.json")) if exp.exists("commands.json") else []
    commands.append({"command": cfg.command, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    exp.put("commands.json", (json.dumps(commands, indent=2) + "\n").encode())
    listing = [{"name": s.name, "label": s.label, "kind": s.kind} for s in plan.stages]
    exp.put("plan.json", (json.dumps(listing, indent=2) + "\n").encode())
    return commands


def write_outputs(
    exp: Store,
    cfg: ExperimentConfig,
    plan: Plan,
    runner: StageRunner,
    commands: list[dict[str, str]],
) -> dict[str, Any]:
    """Tables, figures and the report from the finished stages."""
    rows, leakage, table1 = _segmentation_outputs(exp, cfg, plan, runner)
    written = [TABLE1_MD, TABLE1_CSV, FIGURE2]
    pretrain_md = None
    if plan.classifier_evals:
        pretrain_md = _pretraining_outputs(exp, plan, runner)
        written += [PRETRAIN_MD, PRETRAIN_CSV, FIGURE_PRETRAIN]
    if plan.autoencoders:
        runs = {kind: runner.url(stage) for kind, stage in plan.autoencoders.items()}
        originals, recon = adapters.reconstructions(cfg.dataset, cfg.recipe.data.nih_test, runs)
        exp.put(FIGURE1, figures.reconstructions_figure(originals, recon))
        written.insert(0, FIGURE1)
    text = report.report_markdown(
        cfg=cfg,
        plan=plan,
        runner=runner,
        table1=table1,
        pretraining=pretrain_md,
        leakage=leakage,
        figures=[f for f in written if f.endswith(".png")],
        commands=commands,
    )
    exp.put(REPORT, text.encode())
    return {
        "table1": table1,
        "rows": [asdict(r) for r in rows],
        "leakage": asdict(leakage) if leakage else None,
        "pretraining": pretrain_md,
        "report": exp.url_of(REPORT),
        "files": [exp.url_of(f) for f in [*written, REPORT]],
    }


def _segmentation_outputs(
    exp: Store, cfg: ExperimentConfig, plan: Plan, runner: StageRunner
) -> tuple[list[tables.ArmRow], tables.Comparison | None, str]:
    """Table 1 (Markdown and CSV) with its intervals and a column per label fraction, and
    Figure 2 (a panel per fraction)."""
    settings = cfg.recipe.experiment
    stats = {
        "resamples": settings.bootstrap_resamples,
        "seed": settings.bootstrap_seed,
        "level": settings.confidence,
    }
    results = {  # per fraction: (arm, seed) -> per-image results
        fraction: {
            key: _parquet(exp, f"{s.path}/{adapters.PER_IMAGE}")
            for key, s in runs.evaluations.items()
        }
        for fraction, runs in plan.sweep.items()
    }
    # Every fraction scores the same test images: the manifest is read once for all.
    stats["patients"] = _patients_of(cfg.dataset, [t for r in results.values() for t in r.values()])
    by_fraction = {
        fraction: _fraction_rows(plan, runner, runs.evaluations, results[fraction], stats)
        for fraction, runs in plan.sweep.items()
    }
    rows, per_image = by_fraction[plan.main_fraction]
    leakage = None
    if "leaky" in plan.arms and "labels" in plan.arms:
        leakage = tables.compare(per_image, "leaky", "labels", plan.seeds, **stats)
    sweep = None
    if len(plan.fractions) > 1:
        sweep = tables.fraction_cells({f: r for f, (r, _) in by_fraction.items()})
    table1 = tables.table1_markdown(rows, settings.confidence, leakage, sweep)
    exp.put(TABLE1_MD, table1.encode())
    exp.put(TABLE1_CSV, tables.table1_csv(rows, sweep).encode())
    curves = {
        fraction: {
            arm: [_val_curve(exp, runs.segments[(arm, s)].path) for s in plan.seeds]
            for arm in plan.arms
        }
        for fraction, runs in sorted(plan.sweep.items())
    }
    exp.put(FIGURE2, figures.dice_curves_figure(curves))
    return rows, leakage, table1


def _fraction_rows(
    plan: Plan,
    runner: StageRunner,
    evaluations: dict[tuple[str, int], Any],
    results: dict[tuple[str, int], Any],
    stats: dict[str, Any],
) -> tuple[list[tables.ArmRow], dict[tuple[str, int], dict[str, float]]]:
    """Table 1's rows from one label fraction's evaluations and per-image results, and their
    per-image Dice; ``stats``: the bootstrap's settings and the scored images' patients."""
    summaries = {key: runner.results[s.name] for key, s in evaluations.items()}
    per_image = {key: tables.per_image_dice(t) for key, t in results.items()}
    rows = tables.table1_rows(summaries, per_image, plan.arms, plan.seeds, **stats)
    return rows, per_image


def _pretraining_outputs(exp: Store, plan: Plan, runner: StageRunner) -> str:
    """The classifiers beside their majority share, the clusters: table and figure."""
    cluster = runner.results[plan.cluster.name] if plan.cluster else None
    pre_rows = tables.pretrain_rows(
        {arm: runner.results[s.name] for arm, s in plan.classifier_evals.items()},
        pseudo_classes=tables.pseudo_classes(cluster) if cluster else None,
    )
    pretrain_md = tables.pretrain_markdown(pre_rows, cluster)
    exp.put(PRETRAIN_MD, pretrain_md.encode())
    exp.put(PRETRAIN_CSV, tables.to_csv(pre_rows).encode())
    sizes = tables.cluster_sizes(cluster) if cluster else []
    noise = cluster.get("noise_share") if cluster else None
    exp.put(FIGURE_PRETRAIN, figures.pretraining_figure(pre_rows, sizes, noise))
    return pretrain_md


def _patients_of(dataset: str, results: Any) -> dict[str, str]:
    """Image id -> the manifest's patient key (a keyed hash) of every scored image, joined
    on the sample key: the intervals resample patients."""
    rows = manifest.read(open_store(dataset, create=False), None, ["key", "patient_key"])
    patient_of = dict(zip(rows["key"].to_pylist(), rows["patient_key"].to_pylist(), strict=True))
    out: dict[str, str] = {}
    for table in results:
        for key, image in zip(table["key"].to_pylist(), table["image_id"].to_pylist(), strict=True):
            if patient_of.get(key) is None:
                raise ConfigError(
                    f"{dataset}: scored image {key} has no patient_key in the manifest; "
                    "the intervals resample patients"
                )
            out[image] = patient_of[key]
    return out


def _parquet(store: Store, path: str) -> Any:
    return pq.read_table(io.BytesIO(store.get(path)))


def _val_curve(store: Store, run: str) -> list[float]:
    lines = store.get(f"{run}/metrics.jsonl").decode().splitlines()
    return figures.val_dice_curve([json.loads(line) for line in lines if line.strip()])
