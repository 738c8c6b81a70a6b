"""``EXP/report.md``: the tables and figures with what it takes to reproduce them.

The report says which commands produced the experiment, on which code and library
versions and which device, with which recipe (verbatim), on which data (the audit), and
which stages ran or were reused, with their folders and wall times.
"""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from pneumo.experiment.plan import Plan
from pneumo.experiment.stages import StageRunner
from pneumo.experiment.tables import Comparison

_PACKAGES = (
    "pneumo", "torch", "torchvision", "segmentation-models-pytorch", "timm", "numpy",
    "pyarrow", "scikit-learn", "webdataset", "albumentations",
)  # fmt: skip


def versions() -> dict[str, str]:
    """Python, the key packages, the code's git commit (when run from a checkout), device."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["git commit"] = _git_commit()
    out["device"] = _device()
    return out


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown (not a git checkout)"


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def report_markdown(
    *,
    cfg: Any,
    plan: Plan,
    runner: StageRunner,
    table1: str,
    pretraining: str | None,
    leakage: Comparison | None,
    figures: list[str],
    commands: list[dict[str, str]],
) -> str:
    """The whole report as Markdown."""
    recipe = cfg.recipe
    audit = runner.results[plan.audit.name]
    parts = [f"# {recipe.experiment.name}: segmentation with and without pretraining", ""]
    if recipe.experiment.description.strip():
        parts += [recipe.experiment.description.strip(), ""]
    parts += [
        "## Table 1",
        "",
        table1,
    ]
    if leakage is not None:
        parts += [
            "The `leaky` arm pretrains on NIH including the NIH images of the SIIM val/test "
            "patients (as a pipeline that ignores that SIIM images are NIH images does); its "
            "difference to `labels` is the measured effect of that leak.",
            "",
        ]
    if pretraining:
        parts += ["## Pretraining", "", pretraining]
    parts += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    parts += _data_section(cfg, audit)
    parts += _stages_section(plan, runner)
    parts += _reproduce_section(cfg, commands)
    return "\n".join(parts).rstrip() + "\n"


def _data_section(cfg: Any, audit: dict[str, Any]) -> list[str]:
    lines = [
        "## Data",
        "",
        f"Dataset `{cfg.dataset}` (manifest fingerprint `{audit['dataset_fingerprint']}`, "
        f"{audit['images']} images). Patients in more than one split: "
        f"{audit['overlapping_patients']}. SIIM val/test (`{audit['held_out']['where']}`): "
        f"{audit['held_out']['images']} images of {audit['held_out_patients']} patients, "
        "none of them in a training selection:",
        "",
        "| selection | where | images | patients |",
        "|---|---|---:|---:|",
    ]
    for name, s in audit["selections"].items():
        lines.append(f"| {name} | `{s['where']}` | {s['images']} | {s['patients']} |")
    lines += ["", "| dataset | split | images | patients |", "|---|---|---:|---:|"]
    for g in audit["groups"]:
        lines.append(f"| {g['dataset']} | {g['split']} | {g['images']} | {g['patients']} |")
    return lines + [""]


def _stages_section(plan: Plan, runner: StageRunner) -> list[str]:
    lines = [
        "## Stages",
        "",
        "Each stage's folder is `stages/<kind>-<hash>`: the hash covers its settings and "
        "its inputs' hashes; `stage.json` in it holds the settings, `done.json` the result.",
        "",
        "| stage | folder | this run | wall time of its run |",
        "|---|---|---|---:|",
    ]
    for stage in plan.stages:
        outcome = runner.outcomes.get(stage.name, {})
        seconds = outcome.get("seconds")
        wall = "—" if seconds is None else f"{seconds:.0f} s"
        status = {"skip": "reused", "run": "ran", "resume": "resumed"}.get(outcome.get("status"))
        lines.append(f"| {stage.label} | `{stage.path}` | {status} | {wall} |")
    return lines + [""]


def _reproduce_section(cfg: Any, commands: list[dict[str, str]]) -> list[str]:
    lines = [
        "## Reproduce",
        "",
        "Commands that built this folder (a rerun reuses finished stages, so the last one "
        "alone reproduces everything):",
        "",
        "```",
    ]
    for c in commands:
        lines.append(f"# {c['started']}")
        lines.append(c["command"] or "(called from Python: pneumo.experiment.run.run_experiment)")
    lines += ["```", "", "Versions:", ""]
    lines += [f"- {k}: {v}" for k, v in versions().items()]
    lines += ["", f"Recipe (`{cfg.recipe.source}`, verbatim):", "", "```toml"]
    lines += [cfg.recipe.text.rstrip(), "```", ""]
    lines += [
        "Settings after defaults, as every stage saw them:",
        "",
        "```json",
        json.dumps(_resolved(cfg.recipe), indent=2),
        "```",
    ]
    return lines


def _resolved(recipe: Any) -> dict[str, Any]:
    from dataclasses import asdict, fields

    return {
        f.name: asdict(getattr(recipe, f.name))
        for f in fields(recipe)
        if f.name not in ("source", "text")
    }
