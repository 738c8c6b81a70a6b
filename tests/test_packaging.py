"""Installing pneumo adds one import name, ``pneumo``, and every part imports under it.

The parts live in top-level folders (``training/``, ``evaluation/``, ...) that
``pyproject.toml`` maps into the package; a mapping that leaked a folder as a top-level
module would shadow, or be shadowed by, a user's own ``training/`` folder. Checked from a
folder outside the checkout, where the checkout's folders are not on ``sys.path``: the
wheel's contents, the wheel imported on its own, and the installed package the suite runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from project import PACKAGE_DIR, PARTS, REPO, SETUPTOOLS

# The names a leaking mapping would install: every part's folder, the CLI's sub-package and
# the repository's other Python folder.
GENERIC = sorted({*PARTS.values(), "commands", "benchmarks"})

# Run in a fresh interpreter: which generic names resolve, the given modules imported, and
# the modules pkgutil finds under pneumo's path (the whole package for a wheel).
_PROBE = """
import importlib, importlib.resources, importlib.util, json, pkgutil, sys
asked = json.loads(sys.argv[1])
generic = [n for n in asked["generic"] if importlib.util.find_spec(n) is not None]
files = {m: importlib.import_module(m).__file__ for m in asked["modules"]}
import pneumo
found = sorted(m.name for m in pkgutil.walk_packages(pneumo.__path__, "pneumo."))
recipes = importlib.resources.files("pneumo.experiment") / "recipes"
print(json.dumps({
    "generic": generic,
    "files": files,
    "found": [m for m in found if not m.endswith("__main__")],
    "recipes": sorted(p.name for p in recipes.iterdir() if p.name.endswith(".toml")),
}))
"""


def _probe(cwd: Path, pythonpath: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    asked = {"generic": GENERIC, "modules": sorted(_expected_modules())}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(asked)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def _expected_modules() -> set[str]:
    """Every module file of the listed packages, named as a module of pneumo."""
    names = set()
    for package in SETUPTOOLS["packages"]:
        parent, _, leaf = package.rpartition(".")
        if package in PACKAGE_DIR:
            folder = REPO / PACKAGE_DIR[package]
        else:  # a sub-package inside its parent's folder (pneumo.commands)
            folder = REPO / PACKAGE_DIR[parent] / leaf
        for path in folder.glob("*.py"):
            if path.stem != "__main__":
                names.add(package if path.stem == "__init__" else f"{package}.{path.stem}")
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built (offline, by setuptools' PEP 517 backend) from a copy of the checkout's
    packaged files, so the build leaves nothing in the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in set(PACKAGE_DIR.values()):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    build = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(out)], cwd=src, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.split()[-1]


def test_the_wheel_holds_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"pneumo"}
    assert "pneumo/experiment/recipes/demo.toml" in names
    assert "pneumo/training/loop.py" in names and "pneumo/metrics/siim.py" in names


def test_the_wheel_alone_imports_every_part_and_no_generic_name(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = _probe(elsewhere, pythonpath=site)
    assert got["generic"] == []
    # the wheel holds every module, no more (pkgutil names what is below ``pneumo``)
    assert set(got["found"]) | {"pneumo"} == _expected_modules()
    assert all(Path(f).is_relative_to(site) for f in got["files"].values())
    assert got["recipes"] == ["demo.toml", "report.toml"]


def test_the_installed_package_has_no_generic_name(tmp_path: Path) -> None:
    """The install the suite runs on (``pip install -e .`` in CI): from outside the checkout
    ``import training`` finds nothing, ``import pneumo.training`` finds the part."""
    got = _probe(tmp_path)
    assert got["generic"] == []
    assert Path(got["files"]["pneumo.training"]).parts[-2:] == ("training", "__init__.py")
    assert not any(Path(f).is_relative_to(tmp_path) for f in got["files"].values())
    assert got["recipes"] == ["demo.toml", "report.toml"]
