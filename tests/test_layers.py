"""Imports follow the data: no part of pneumo imports a part above it.

shards <- ingest <- synthetic; metrics (no pneumo imports); shards, metrics <- training <-
pseudolabels; training <- evaluation <- experiment; the CLI on top. Read from the source
with ``ast`` (imports inside functions included), so a lazy upward import is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from project import PARTS, REPO

# part -> the parts it may import (besides itself)
ALLOWED = {
    "shards": set(),
    "metrics": set(),
    "ingest": {"shards"},
    "synthetic": {"ingest", "shards"},
    "training": {"shards", "metrics"},
    "pseudolabels": {"training", "shards", "metrics"},
    "evaluation": {"training", "metrics", "ingest", "shards"},
    "experiment": {"evaluation", "pseudolabels", "training", "metrics", "synthetic", "ingest",
                   "shards"},
}  # fmt: skip
GENERIC = set(PARTS) | {"commands"}


def imported_parts(path: Path) -> set[str]:
    """The parts ``path`` imports: ``pneumo.<part>`` names; a bare ``training`` is kept as
    ``bare:training`` (it would import a folder, not the package)."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            head, _, rest = name.partition(".")
            if head == "pneumo" and rest:
                parts.add(rest.split(".")[0])
            elif head in GENERIC:
                parts.add(f"bare:{head}")
    return parts


@pytest.mark.parametrize("part", sorted(PARTS))  # a new part without a rule fails
def test_a_part_imports_only_the_parts_below_it(part: str) -> None:
    assert part in ALLOWED, f"{part} is mapped in pyproject.toml: give it a rule in ALLOWED"
    wrong = {
        f"{path.relative_to(REPO)}: {sorted(found - ALLOWED[part] - {part})}"
        for path in sorted((REPO / PARTS[part]).rglob("*.py"))
        if (found := imported_parts(path)) - ALLOWED[part] - {part}
    }
    assert not wrong


def test_nothing_imports_a_part_by_its_bare_folder_name() -> None:
    files = [p for p in REPO.rglob("*.py") if not {".venv", "build"} & set(p.parts)]
    bare = {str(p.relative_to(REPO)) for p in files if any(
        n.startswith("bare:") for n in imported_parts(p))}  # fmt: skip
    assert not bare


def test_the_planted_upward_import_is_seen(tmp_path: Path) -> None:
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    from pneumo.evaluation import report\n    import training\n")
    assert imported_parts(probe) == {"evaluation", "bare:training"}
