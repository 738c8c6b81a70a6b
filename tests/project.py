"""What pyproject.toml says the package is made of, read once for the tests that check it.

``PACKAGE_DIR`` maps each package name to its folder (``pneumo.training`` -> ``training``);
``PARTS`` maps each part's short name to its folder (``training`` -> ``training``), the
``pneumo`` folder itself (the CLI) left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS: dict = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]
PARTS: dict[str, str] = {
    name.removeprefix("pneumo."): folder for name, folder in PACKAGE_DIR.items() if name != "pneumo"
}
