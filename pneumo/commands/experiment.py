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
        "sees the SIIM val/test patients), imagenet (opt-in: needs --imagenet-weights). "
        "Default: the recipe's."
    ),
]
FractionsOption = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated shares of the SIIM training patients every arm and seed trains "
        "on, e.g. 0.01,0.1,1.0 (nested subsets of whole patients; validation and test stay "
        "the same). Default: the recipe's label_fractions."
    ),
]
ImagenetOption = Annotated[
    str | None,
    typer.Option(
        help="The imagenet arm's encoder: a torchvision or timm ResNet-34 state dict file "
        "(e.g. torchvision's resnet34-b627a593.pth), downloaded once; its SHA-256 names the "
        "arm's stages."
    ),
]
ExecutorOption = Annotated[
    str,
    typer.Option(
        help="Where the stages run: local (this machine) or ray (the Ray cluster RAY_ADDRESS "
        "names, or a local Ray when unset; EXP and DATASET must then be on S3 or a "
        "filesystem every node mounts at the same path)."
    ),
]
ParallelOption = Annotated[
    int,
    typer.Option(
        help="local: stages at the same time on the CPUs, each in its own process with a "
        "share of the cores. 1: one after another.",
        min=1,
    ),
]
DevicesOption = Annotated[
    str | None,
    typer.Option(
        help="local: comma-separated devices, one stage at a time on each, e.g. cuda:0,cuda:1."
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
    label_fractions: FractionsOption = None,
    imagenet_weights: ImagenetOption = None,
    resume: ResumeOption = "auto",
    executor: ExecutorOption = "local",
    parallel: ParallelOption = 1,
    devices: DevicesOption = None,
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
        label_fractions=parse_fractions(label_fractions),
        imagenet_weights=imagenet_weights,
        resume=resume,
        command="pneumo " + shlex.join(sys.argv[1:]),
        executor=executor_config(executor, parallel, devices),
    )
    result = run_with_progress(cfg)
    print_result(result)


def executor_config(kind: str, parallel: int, devices: str | None) -> Any:
    from pneumo.experiment.executors import ExecutorConfig, parse_devices

    return ExecutorConfig(kind=kind, parallel=parallel, devices=parse_devices(devices))


def parse_arms(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(a.strip() for a in text.split(",") if a.strip())


def parse_fractions(text: str | None) -> tuple[float, ...] | None:
    """``"0.01,0.1,1.0"`` -> ``(0.01, 0.1, 1.0)``; the values are checked by the plan."""
    from pneumo.shards.errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise ConfigError(
            f"--label-fractions {text!r}: give comma-separated numbers in (0, 1], like 0.01,0.1,1.0"
        ) from None


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
    """Renders the stage runner's events: one line per stage, a bar per running stage
    (several at once with --parallel or --devices)."""

    def __init__(self) -> None:
        self.bars: dict[str, ProgressBar] = {}

    def update(self, event: dict[str, Any]) -> None:
        if event["event"] == "step":
            self._step(event)
            return
        head = f"[{event['index']:>2}/{event['total']}] {event['label']}"
        status = event["status"]
        if status in ("run", "resume"):
            verb = "resuming" if status == "resume" else "running"
            typer.echo(f"{head}: {verb} in {event['name']}")
            self._close(event["label"])
            self.bars[event["label"]] = ProgressBar(event["label"], unit="step")
        elif status == "done":
            self._close(event["label"])
            typer.echo(f"{head}: done in {event['seconds']:.0f} s{stage_note(event)}")
        else:
            typer.echo(f"{head}: done before, reused ({event['name']}){stage_note(event)}")

    def _step(self, p: dict[str, Any]) -> None:
        bar = self.bars.get(p.get("label", ""))
        if bar is None:
            return
        if "step" in p:
            loss = p.get("loss")
            postfix = {"loss": f"{loss:.4f}"} if isinstance(loss, float) else {}
            bar.update_to(p["step"], p.get("total"), **postfix)
        elif "images" in p:
            bar.update_to(p["images"])
        elif "done" in p:
            bar.update_to(p["done"], p.get("total"))

    def _close(self, label: str) -> None:
        bar = self.bars.pop(label, None)
        if bar is not None:
            bar.__exit__()

    def close(self) -> None:
        for label in list(self.bars):
            self._close(label)


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
    if kind == "weights" and r.get("sha256"):
        return f": {r.get('source')}, sha256 {r['sha256']}"
    if kind == "segment" and r.get("best_val_dice") is not None:
        return f": best val Dice {100 * r['best_val_dice']:.1f}"
    if kind == "evaluate-classify" and r.get("auroc") is not None:
        return (
            f": AUROC {r['auroc']:.3f}, balanced accuracy {100 * r['balanced_accuracy']:.1f}%, "
            f"majority share {100 * r['majority_rate']:.1f}%"
        )
    return ""
