"""benchmarks/mutmut_core.py's own bookkeeping: what it runs exists, its equivalent list is
well-formed, and a score is counted the way the README says (mutmut itself is not run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "mutmut_core.py"


def _load():
    spec = importlib.util.spec_from_file_location("mutmut_core", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["mutmut_core"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mc = _load()


def test_every_group_names_modules_and_test_files_that_exist():
    for name, group in mc.GROUPS.items():
        assert group.modules and group.tests, name
        for path in (*group.modules, *group.tests):
            assert (ROOT / path).is_file(), f"{name}: {path}"
        assert group.isolation in ("fork", "forkserver")


def test_every_equivalent_mutant_says_why_and_belongs_to_a_mutated_module():
    modules = {mc.module_name(m) for g in mc.GROUPS.values() for m in g.modules}
    entries = mc.load_equivalent()
    assert entries
    for e in entries:
        assert set(e) == {"module", "function", "mutated", "why"}, e
        assert e["module"] in modules and e["why"].strip() and e["mutated"].strip(), e
    keys = [(e["module"], e["function"], e["mutated"]) for e in entries]
    assert len(keys) == len(set(keys))  # listed once


MUTANTS = """
def x_halve__mutmut_orig(n):
    return n // 2


def x_halve__mutmut_1(n):
    return n / 2


def x_halve__mutmut_2(n):
    return n // 3


def x_halve__mutmut_3(n):
    return n // 2 + 0


class Thing:
    def xǁThingǁsize__mutmut_orig(self):
        return 4

    def xǁThingǁsize__mutmut_1(self):
        return 5
"""


def _workspace(tmp_path: Path, codes: dict[str, int | None]) -> Path:
    target = tmp_path / "mutants" / "pneumo" / "ingest" / "toy.py"
    target.parent.mkdir(parents=True)
    target.write_text(MUTANTS)
    meta = {"exit_code_by_key": {f"pneumo.ingest.toy.{k}": v for k, v in codes.items()}}
    target.with_name("toy.py.meta").write_text(json.dumps(meta))
    return tmp_path


def test_mutants_are_read_with_their_function_and_changed_line(tmp_path):
    codes = {"x_halve__mutmut_1": 1, "x_halve__mutmut_2": 0, "xǁThingǁsize__mutmut_1": 36}
    mutants = {
        m.name.rsplit(".", 1)[1]: m
        for m in mc.read_mutants(_workspace(tmp_path, codes), "ingest/toy.py")
    }
    two = mutants["x_halve__mutmut_2"]
    assert (two.module, two.function, two.exit_code) == ("pneumo.ingest.toy", "halve", 0)
    assert (two.removed, two.added) == (["return n // 2"], ["return n // 3"])
    size = mutants["xǁThingǁsize__mutmut_1"]
    assert (size.function, size.added) == ("Thing.size", ["return 5"])


def test_a_score_leaves_out_equivalent_survivors_and_counts_timeouts_as_killed(tmp_path):
    codes = {
        "x_halve__mutmut_1": 1,  # killed
        "x_halve__mutmut_2": 0,  # survived
        "x_halve__mutmut_3": 0,  # survived, listed as equivalent
        "xǁThingǁsize__mutmut_1": 36,  # timeout: caught
    }
    mutants = mc.read_mutants(_workspace(tmp_path, codes), "ingest/toy.py")
    equivalent = [
        {"module": "pneumo.ingest.toy", "function": "halve", "mutated": "return n // 2 + 0"}
    ]
    s = mc.score(mutants, equivalent)
    assert (s["mutants"], s["killed"], s["equivalent"], s["survived"]) == (4, 2, 1, 1)
    assert s["score"] == 2 / 3
    assert [m.name for m in s["survivors"]] == ["pneumo.ingest.toy.x_halve__mutmut_2"]
    assert mc.score(mutants, [])["score"] == 2 / 4
    other_function = [dict(equivalent[0], function="size")]
    assert mc.score(mutants, other_function)["equivalent"] == 0
    not_run = mc.read_mutants(
        _workspace(tmp_path / "b", {"x_halve__mutmut_1": None}), "ingest/toy.py"
    )
    assert mc.score(not_run, [])["not_run"] == 1


def test_the_scratch_copy_is_a_plain_pneumo_package_with_mutmuts_config(tmp_path):
    group = mc.GROUPS["rle"]
    mc.build_workspace(tmp_path / "ws", group)
    ws = tmp_path / "ws"
    assert (ws / "pneumo" / "ingest" / "rle.py").read_text() == (ROOT / "ingest/rle.py").read_text()
    assert (ws / "pneumo" / "cli.py").is_file() and (ws / "tests" / "conftest.py").is_file()
    config = tomllib.loads((ws / "pyproject.toml").read_text())
    mutmut = config["tool"]["mutmut"]
    assert mutmut["only_mutate"] == ["pneumo/ingest/rle.py"]
    assert mutmut["pytest_add_cli_args_test_selection"] == list(group.tests)
    assert "not slow" in config["tool"]["pytest"]["ini_options"]["addopts"]
    assert config["tool"]["pytest"]["ini_options"]["markers"]  # --strict-markers still works
