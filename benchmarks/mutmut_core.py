"""Mutation score of the core modules with mutmut 3: every mutant the tool can plant.

`benchmarks/mutation.py` plants bugs we chose, across modules (commit order, resume, DDP).
This script lets a tool choose: mutmut rewrites each function of a module into its mutants
(operators, constants, comparisons, arguments, strings, dropped calls) and runs, for each
mutant, the tests that call that function. A mutant *survives* when those tests pass.

    python benchmarks/mutmut_core.py                       # every group (about 40 min, 2 cores)
    python benchmarks/mutmut_core.py --group rle stream    # some of them
    python benchmarks/mutmut_core.py --list                # the groups, modules and tests

Each group is a few modules and the test files written for them (per-module test selection:
mutmut runs only the selected tests that reach the mutated function). mutmut derives module
names from file paths, and our parts live in top-level folders that install as
`pneumo.<part>`, so each group runs in a scratch copy laid out as a plain `pneumo/` package
(under `--workdir`, default a temporary folder, removed at the end unless `--keep`).

Score of a module = killed / (mutants - equivalent). Killed includes timeouts (a mutant that
loops is caught). Equivalent mutants are the survivors listed in
`benchmarks/mutmut_equivalent.toml`, each with the reason it cannot change behaviour; they
are matched by module, function and the mutated line, so they survive code moves. Every
other survivor is printed with its diff. Exit code 0 when every module reaches `--goal`
(default 90%), 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = Path(__file__).with_name("mutmut_equivalent.toml")
# The folders that install as pneumo.<part> (pyproject.toml's package-dir).
PARTS = (
    "shards",
    "ingest",
    "synthetic",
    "metrics",
    "training",
    "pseudolabels",
    "evaluation",
    "experiment",
)
# mutmut's exit codes per mutant (mutmut.stats.status_by_exit_code).
KILLED = {1, 3, 24, -24, 152, 255, 36}  # 36, 24, 152, 255: timeouts
SURVIVED = 0
NO_TESTS = {5, 33}


@dataclass(frozen=True)
class Group:
    modules: tuple[str, ...]  # paths in this repository
    tests: tuple[str, ...]
    why: str
    # mutmut forks a worker per mutant from a process that ran the tests: after torch has
    # started its thread pools a forked child can hang, so torch groups fork from a clean
    # server process (mutmut's "forkserver").
    isolation: str = "fork"


GROUPS: dict[str, Group] = {
    "rle": Group(
        ("ingest/rle.py",),
        (
            "tests/ingest/test_rle.py",
            "tests/ingest/test_rle_properties.py",
            "tests/ingest/test_masks.py",
        ),
        "the SIIM run-length codec of every label and submission",
    ),
    "patients": Group(
        ("ingest/patients.py",),
        (
            "tests/ingest/test_patients.py",
            "tests/ingest/test_patient_secret.py",
            "tests/ingest/test_dicom_patients.py",
            "tests/ingest/test_splits.py",
            "tests/ingest/test_split_properties.py",
        ),
        "patient keys and the split policy: what keeps a patient in one split",
    ),
    "manifest": Group(
        ("shards/manifest.py",),
        (
            "tests/shards/test_manifest_units.py",
            "tests/shards/test_query.py",
            "tests/shards/test_filtered_relabel_reads.py",
            "tests/ingest/test_relabel.py",
            "tests/ingest/test_relabel_semantics.py",
            "tests/shards/test_legacy_manifest.py",
        ),
        "manifest reads, committed-batch filters and relabel resolution",
    ),
    "stream": Group(
        ("shards/stream.py", "shards/slots.py", "shards/elastic.py"),
        (
            "tests/shards/test_stream.py",
            "tests/shards/test_sampling.py",
            "tests/shards/test_slot_properties.py",
            "tests/shards/test_stream_integrity.py",
            "tests/shards/test_elastic.py",
        ),
        "stream planning and sampling: each sample once per pass, on every rank, resume and layout",
    ),
    "siim": Group(
        ("metrics/siim.py",),
        (
            "tests/metrics/test_siim_dice.py",
            "tests/metrics/test_dice_properties.py",
            "tests/evaluation/test_siim_metric.py",
        ),
        "the SIIM Dice and its post-processing search",
    ),
    "losses": Group(
        ("training/losses.py",),
        ("tests/training/test_losses.py", "tests/training/test_config_reaches_use.py"),
        "the weighted focal + dice loss",
        isolation="forkserver",
    ),
    "classify": Group(
        ("training/classify.py",),
        (
            "tests/training/test_classify_units.py",
            "tests/training/test_classify.py",
            "tests/training/test_config_reaches_use.py",
        ),
        "the classifier task: its optimizer, plateau scheduler, loss and label wiring",
        isolation="forkserver",
    ),
    "experiment": Group(
        ("experiment/stats.py", "experiment/tables.py"),
        (
            "tests/experiment/test_stats.py",
            "tests/experiment/test_bootstrap_properties.py",
            "tests/experiment/test_tables.py",
            "tests/experiment/test_table_text.py",
            "tests/experiment/test_table_values.py",
            "tests/experiment/test_stats_patients.py",
            "tests/experiment/test_sweep.py",
        ),
        "the experiment's statistics and Table 1",
    ),
    "audit": Group(
        ("shards/audit.py",),
        ("tests/shards/test_audit.py", "tests/ingest/test_splits.py"),
        "the split audit (patients in more than one split)",
    ),
}


def package_path(module: str) -> str:
    """`ingest/rle.py` -> `pneumo/ingest/rle.py` (the path inside the scratch package)."""
    return module if module.startswith("pneumo/") else f"pneumo/{module}"


def module_name(module: str) -> str:
    return package_path(module)[: -len(".py")].replace("/", ".")


def build_workspace(dest: Path, group: Group) -> None:
    """A copy of the tree laid out as an importable `pneumo/` package, with mutmut's config."""
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "pneumo", dest / "pneumo", ignore=ignore)
    for part in PARTS:
        shutil.copytree(ROOT / part, dest / "pneumo" / part, ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    pytest_options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    ini = dict(pytest_options["ini_options"])
    # Slow and S3-server tests stay out of the mutant runs; each mutant runs only fast tests.
    ini["addopts"] = "--strict-markers -m 'not gpu and not slow and not integration'"
    config = {
        "source_paths": ["pneumo"],
        "only_mutate": [package_path(m) for m in group.modules],
        "pytest_add_cli_args_test_selection": list(group.tests),
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q", "-x"],
        "do_not_mutate_patterns": [r"^\s*(log|logger)\.(debug|info|warning)\("],
        "process_isolation": group.isolation,
    }
    (dest / "pyproject.toml").write_text(
        _toml({"tool": {"mutmut": config, "pytest": {"ini_options": ini}}})
    )


def _toml(data: dict, prefix: str = "") -> str:
    """The small TOML writer this config needs (tables of strings, numbers and lists)."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}.{key}" if prefix else key
        body = _toml(value, name)
        has_values = any(not isinstance(v, dict) for v in value.values())
        out += (f"\n[{name}]\n" if has_values else "") + body
    return out


def run_mutmut(workspace: Path, max_children: int, budget_s: float) -> tuple[int, float, str]:
    env = dict(os.environ)
    env.setdefault("PNEUMO_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    mutmut = [sys.executable, "-c", "from mutmut.__main__ import cli; cli()"]
    start = time.monotonic()
    try:
        done = subprocess.run(
            [*mutmut, "run", "--max-children", str(max_children)],
            cwd=workspace,
            env=env,
            capture_output=True,
            text=True,
            timeout=budget_s,
        )
        code, tail = done.returncode, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        code, tail = -1, f"stopped after the budget of {budget_s:.0f} s\n{out[-2000:]}"
    return code, time.monotonic() - start, tail


@dataclass
class Mutant:
    name: str
    module: str
    function: str
    exit_code: int | None
    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)


def function_sources(path: Path) -> dict[str, str]:
    source = path.read_text()
    tree = ast.parse(source)
    return {
        node.name: ast.get_source_segment(source, node) or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "__mutmut_" in node.name
    }


def read_mutants(workspace: Path, module: str) -> list[Mutant]:
    mutated = workspace / "mutants" / package_path(module)
    meta = mutated.with_name(mutated.name + ".meta")
    if not meta.exists():
        return []
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    sources = function_sources(mutated)
    out = []
    for name, code in sorted(codes.items()):
        local = name.rsplit(".", 1)[1]  # x_rle_runs__mutmut_3 / xǁPostProcessǁapply__mutmut_2
        base = local.rsplit("__mutmut_", 1)[0]
        function = base[2:] if base.startswith("x_") else base[1:].replace("ǁ", ".").strip(".")
        m = Mutant(name, module_name(module), function, code)
        orig = sources.get(f"{base}__mutmut_orig", "").splitlines()
        new = sources.get(local, "").splitlines()
        for line in difflib.ndiff(orig[1:], new[1:]):  # the def line differs by name only
            if line.startswith("- "):
                m.removed.append(line[2:].strip())
            elif line.startswith("+ "):
                m.added.append(line[2:].strip())
        out.append(m)
    return out


def load_equivalent() -> list[dict[str, str]]:
    if not EQUIVALENT.exists():
        return []
    return tomllib.loads(EQUIVALENT.read_text()).get("equivalent", [])


def is_equivalent(m: Mutant, known: Iterable[dict[str, str]]) -> dict[str, str] | None:
    mutated = " / ".join(m.added) or "(line removed) " + " / ".join(m.removed)
    for entry in known:
        if (
            entry["module"] == m.module
            and entry["function"] == m.function
            and entry["mutated"].strip() == mutated
        ):
            return entry
    return None


def mutated_text(m: Mutant) -> str:
    return " / ".join(m.added) or "(line removed) " + " / ".join(m.removed)


def score(mutants: list[Mutant], known: list[dict[str, str]]) -> dict[str, object]:
    killed = sum(m.exit_code in KILLED for m in mutants)
    equivalent = [m for m in mutants if m.exit_code not in KILLED and is_equivalent(m, known)]
    survivors = [m for m in mutants if m.exit_code not in KILLED and not is_equivalent(m, known)]
    counted = len(mutants) - len(equivalent)
    return {
        "mutants": len(mutants),
        "killed": killed,
        "equivalent": len(equivalent),
        "survived": len(survivors),
        "not_run": sum(m.exit_code is None for m in mutants),
        "score": killed / counted if counted else 1.0,
        "survivors": survivors,
    }


def run_group(name: str, workdir: Path, args: argparse.Namespace, known: list) -> dict:
    """mutmut on one group in its scratch copy: module -> score (see :func:`score`)."""
    group = GROUPS[name]
    workspace = workdir / name
    build_workspace(workspace, group)
    print(f"[{name}] mutmut on {', '.join(group.modules)} ...", flush=True)
    code, seconds, tail = run_mutmut(workspace, args.max_children, args.budget_min * 60)
    if code != 0:
        print(f"[{name}] mutmut exited {code} after {seconds:.0f} s:\n{tail}")
    results = {}
    for module in group.modules:
        s = score(read_mutants(workspace, module), known)
        s["seconds"], s["mutmut_exit"] = round(seconds), code
        results[module] = s
        print(
            f"[{name}] {module}: {s['killed']}/{s['mutants']} killed, {s['equivalent']} "
            f"equivalent, {s['survived']} survived: {s['score']:.1%} ({seconds:.0f} s)",
            flush=True,
        )
    if not args.keep:
        shutil.rmtree(workspace, ignore_errors=True)
    return results


def report(results: dict[str, dict], json_path: Path | None) -> None:
    """The score table (Markdown, as in the README) and every non-equivalent survivor."""
    print("\n| module | mutants | killed | equivalent | survived | score |")
    print("|---|---:|---:|---:|---:|---:|")
    for module, s in results.items():
        print(
            f"| `{module}` | {s['mutants']} | {s['killed']} | {s['equivalent']} | {s['survived']} "
            f"| {s['score']:.1%} |"
        )
    survivors = [m for s in results.values() for m in s["survivors"]]
    for m in survivors:
        print(f"\nsurvived {m.name} (exit {m.exit_code}) in {m.function}:")
        for line in m.removed:
            print(f"  - {line}")
        for line in m.added:
            print(f"  + {line}")
    if json_path:
        out = {
            module: {
                **{k: v for k, v in s.items() if k != "survivors"},
                "survivors": [
                    {"name": m.name, "function": m.function, "mutated": mutated_text(m)}
                    for m in s["survivors"]
                ],
            }
            for module, s in results.items()
        }
        json_path.write_text(json.dumps(out, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--group", nargs="+", choices=sorted(GROUPS), help="groups to run (default: all)"
    )
    parser.add_argument("--list", action="store_true", help="print the groups and exit")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch copies (mutmut browse)"
    )
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--budget-min", type=float, default=20.0, help="time limit per group")
    parser.add_argument("--goal", type=float, default=0.90)
    parser.add_argument("--json", type=Path, help="write the scores and survivors here")
    args = parser.parse_args(argv)
    names = args.group or list(GROUPS)
    if args.list:
        for name in names:
            g = GROUPS[name]
            print(f"{name}: {g.why}")
            print(f"  modules: {', '.join(g.modules)}\n  tests:   {', '.join(g.tests)}")
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pneumo-mutmut-"))
    known = load_equivalent()
    results: dict[str, dict] = {}
    try:
        for name in names:
            results.update(run_group(name, workdir, args, known))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, args.json)
    ok = all(
        s["mutants"] and s["score"] >= args.goal and not s["not_run"] and s["mutmut_exit"] == 0
        for s in results.values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
