"""``pneumo experiment``: the report's Table 1, Figures 1 and 2 in one command."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Any

import typer

from pneumo.commands.options import DatasetArg
from pneumo.render import ProgressBar, fail_on_errors

RecipeOption = Annotated[
    str,
    typer.Option(
        help="The stages' settings: 'report' (the report's, for a GPU and the real data), "
        "'demo' (CPU, minutes), or a TOML file (see experiment/recipes/)."
    ),
]
SeedsOption = Annotated[
    int | None,
    typer.Option(help="Segmentation seeds per arm. Default: the recipe's.", min=1),
]
ArmsOption = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated arms: none, labels, pseudo, leaky (opt-in: pretraining that "
        "sees the SIIM val/test patients). Default: the recipe's."
    ),
]
ResumeOption = Annotated[
    str,
    typer.Option(
        help="auto: an interrupted stage continues from its checkpoint; never: it restarts. "
        "Finished stages are reused either way."
    ),
]


@fail_on_errors
def experiment_cmd(
    dataset: DatasetArg,
    out: Annotated[str, typer.Option(help="EXP: folder or s3:// prefix for everything.")],
    recipe: RecipeOption = "report",
    seeds: SeedsOption = None,
    arms: ArmsOption = None,
    resume: ResumeOption = "auto",
) -> None:
    """Compare U-Net segmentation without and with NIH pretraining (labels, pseudo-labels):
    Table 1 with paired bootstrap intervals, Figures 1 and 2, EXP/report.md."""
    from pneumo.experiment.recipe import load_recipe
    from pneumo.experiment.run import ExperimentConfig

    cfg = ExperimentConfig(
        dataset=dataset,
        out=out,
        recipe=load_recipe(recipe),
        seeds=seeds,
        arms=parse_arms(arms),
        resume=resume,
        command="pneumo " + shlex.join(sys.argv[1:]),
    )
    result = run_with_progress(cfg)
    print_result(result)


def parse_arms(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(a.strip() for a in text.split(",") if a.strip())


def run_with_progress(cfg: Any) -> dict[str, Any]:
    """Run the experiment with a line per stage and a progress bar inside each."""
    from pneumo.experiment.run import run_experiment

    view = StageView()
    try:
        return run_experiment(cfg, progress=view.update)
    finally:
        view.close()


def print_result(result: dict[str, Any]) -> None:
    typer.echo("")
    typer.echo("Table 1: SIIM test Dice per arm")
    typer.echo(result["table1"])
    if result.get("pretraining"):
        typer.echo("Pretraining")
        typer.echo(result["pretraining"])
    typer.echo(f"report: {result['report']}")


class StageView:
    """Renders the stage runner's events: one line per stage, a bar while it runs."""

    def __init__(self) -> None:
        self.bar: ProgressBar | None = None

    def update(self, event: dict[str, Any]) -> None:
        if event["event"] == "step":
            self._step(event)
            return
        head = f"[{event['index']:>2}/{event['total']}] {event['label']}"
        status = event["status"]
        if status in ("run", "resume"):
            verb = "resuming" if status == "resume" else "running"
            typer.echo(f"{head}: {verb} in {event['name']}")
            self.close()
            self.bar = ProgressBar(event["label"], unit="step")
        elif status == "done":
            self.close()
            typer.echo(f"{head}: done in {event['seconds']:.0f} s{stage_note(event)}")
        else:
            typer.echo(f"{head}: done before, reused ({event['name']}){stage_note(event)}")

    def _step(self, p: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if "step" in p:
            loss = p.get("loss")
            postfix = {"loss": f"{loss:.4f}"} if isinstance(loss, float) else {}
            self.bar.update_to(p["step"], p.get("total"), **postfix)
        elif "images" in p:
            self.bar.update_to(p["images"])
        elif "done" in p:
            self.bar.update_to(p["done"], p.get("total"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__()
            self.bar = None


def stage_note(event: dict[str, Any]) -> str:
    """The figure a stage is about, for its progress line."""
    r = event.get("result") or {}
    kind = event["name"].rsplit("-", 1)[0]
    if kind == "audit":
        return (
            f": {r.get('images')} images, {r.get('overlapping_patients')} patients in two "
            f"splits, {r.get('held_out_patients')} SIIM val/test patients held out"
        )
    if kind == "evaluate" and r.get("dice") is not None:
        pos = r.get("dice_pos")
        pos_text = f", positives {100 * pos:.1f}" if pos is not None else ""
        return f": test Dice {100 * r['dice']:.1f}{pos_text} ({r.get('n_images')} images)"
    if kind == "segment" and r.get("best_val_dice") is not None:
        return f": best val Dice {100 * r['best_val_dice']:.1f}"
    if kind == "evaluate-classify" and r.get("auroc") is not None:
        return (
            f": AUROC {r['auroc']:.3f}, balanced accuracy {100 * r['balanced_accuracy']:.1f}%, "
            f"majority share {100 * r['majority_rate']:.1f}%"
        )
    return ""
