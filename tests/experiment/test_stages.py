"""Hash-named stages: skipped when done, resumed when interrupted, rerun only downstream
of a changed setting. Stage functions here count their executions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pneumo.experiment.stages import DONE_FILE, STAGE_FILE, Stage, StageContext, StageRunner
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import open_store


class Crash(Exception):
    """Stands for a kill in the middle of a stage."""


class Functions:
    """Stage functions that write a file, count calls, and can crash once mid-stage."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.crash_in: str | None = None
        self.seen_partial: dict[str, bool] = {}

    def __call__(self, ctx: StageContext) -> dict[str, Any]:
        label = ctx.stage.label
        self.calls[label] += 1
        store = open_store(ctx.url)
        self.seen_partial[label] = store.exists("partial.txt")
        store.put("partial.txt", b"half")
        if self.crash_in == label:
            self.crash_in = None
            raise Crash(label)
        total = ctx.stage.settings["value"] + sum(r["total"] for r in ctx.inputs.values())
        store.put("out.txt", str(total).encode())
        return {"total": total}

    def table(self) -> dict[str, Any]:
        return {"thing": self}


def chain(values: dict[str, int]) -> list[Stage]:
    """a -> b -> c, and a -> d: four stages, settings from ``values``."""
    a = Stage(kind="thing", label="a", settings={"value": values["a"]})
    b = Stage(kind="thing", label="b", settings={"value": values["b"]}, inputs=(("in", a),))
    c = Stage(kind="thing", label="c", settings={"value": values["c"]}, inputs=(("in", b),))
    d = Stage(kind="thing", label="d", settings={"value": values["d"]}, inputs=(("in", a),))
    return [a, b, c, d]


VALUES = {"a": 1, "b": 10, "c": 100, "d": 1000}


def run(exp: Path | str, fns: Functions, stages: list[Stage], **kw: Any) -> StageRunner:
    runner = StageRunner(exp=str(exp), dataset="unused", functions=fns.table(), **kw)
    runner.run_all(stages)
    return runner


def test_results_flow_downstream_and_a_rerun_does_nothing(tmp_path: Path) -> None:
    fns = Functions()
    stages = chain(VALUES)
    first = run(tmp_path, fns, stages)
    assert [first.results[s.name]["total"] for s in stages] == [1, 11, 111, 1001]
    assert fns.calls == Counter(a=1, b=1, c=1, d=1)
    again = run(tmp_path, fns, chain(VALUES))  # new objects, same hashes
    assert fns.calls == Counter(a=1, b=1, c=1, d=1)
    assert again.results == first.results
    assert {o["status"] for o in again.outcomes.values()} == {"skip"}


def test_a_changed_setting_reruns_that_stage_and_what_depends_on_it(tmp_path: Path) -> None:
    fns = Functions()
    before = chain(VALUES)
    run(tmp_path, fns, before)
    after = chain({**VALUES, "b": 20})
    runner = run(tmp_path, fns, after)
    assert fns.calls == Counter(a=1, b=2, c=2, d=1)
    assert [s.name == t.name for s, t in zip(before, after, strict=True)] == [
        True,
        False,
        False,
        True,
    ]
    assert runner.results[after[2].name]["total"] == 121
    # the old stages stay on disk: changing b back costs nothing
    run(tmp_path, fns, chain(VALUES))
    assert fns.calls == Counter(a=1, b=2, c=2, d=1)


def test_a_killed_stage_resumes_in_its_folder_and_finished_ones_are_kept(tmp_path: Path) -> None:
    fns = Functions()
    fns.crash_in = "c"
    with pytest.raises(Crash):
        run(tmp_path, fns, chain(VALUES))
    c = chain(VALUES)[2]
    store = open_store(tmp_path)
    assert store.exists(f"{c.path}/{STAGE_FILE}") and not store.exists(f"{c.path}/{DONE_FILE}")
    events: list[dict[str, Any]] = []
    runner = run(tmp_path, fns, chain(VALUES), progress=events.append)
    assert fns.calls == Counter(a=1, b=1, c=2, d=1)  # only c twice
    assert fns.seen_partial["c"]  # the second attempt found the first one's files
    statuses = {e["label"]: e["status"] for e in events if e["status"] != "done"}
    assert statuses == {"a": "skip", "b": "skip", "c": "resume", "d": "run"}
    assert runner.results[c.name] == {"total": 111}


def test_resume_never_empties_the_interrupted_folder(tmp_path: Path) -> None:
    fns = Functions()
    fns.crash_in = "b"
    with pytest.raises(Crash):
        run(tmp_path, fns, chain(VALUES))
    run(tmp_path, fns, chain(VALUES), resume="never")
    assert fns.calls["b"] == 2 and not fns.seen_partial["b"]
    with pytest.raises(ConfigError, match="--resume 'sometimes'"):
        StageRunner(exp=str(tmp_path), dataset="x", functions={}, resume="sometimes")


def test_done_json_is_the_commit(tmp_path: Path) -> None:
    fns = Functions()
    stages = chain(VALUES)
    run(tmp_path, fns, stages)
    record = json.loads((tmp_path / stages[1].path / DONE_FILE).read_text())
    assert record["result"] == {"total": 11} and record["label"] == "b"
    described = json.loads((tmp_path / stages[1].path / STAGE_FILE).read_text())
    assert described["inputs"] == {"in": stages[0].name}
    assert described["settings"] == {"value": 10}
    (tmp_path / stages[1].path / DONE_FILE).unlink()  # as if killed just before the commit
    run(tmp_path, fns, chain(VALUES))
    assert fns.calls == Counter(a=1, b=2, c=1, d=1)  # c's own marker still stands


def test_the_hash_covers_kind_settings_and_inputs_but_not_the_label() -> None:
    a = Stage(kind="k", label="one", settings={"x": 1, "y": [1, 2]})
    assert a.name == Stage(kind="k", label="two", settings={"y": [1, 2], "x": 1}).name
    assert a.name != Stage(kind="k", label="one", settings={"x": 2, "y": [1, 2]}).name
    assert a.name != Stage(kind="j", label="one", settings={"x": 1, "y": [1, 2]}).name
    b1 = Stage(kind="k", label="b", settings={}, inputs=(("in", a),))
    other = Stage(kind="k", label="one", settings={"x": 3, "y": [1, 2]})
    assert b1.name != Stage(kind="k", label="b", settings={}, inputs=(("in", other),)).name
    assert a.name.startswith("k-") and a.path == f"stages/{a.name}"


@pytest.mark.integration
def test_on_s3_a_killed_stage_resumes_and_done_ones_are_skipped(s3_bucket: str) -> None:
    exp = f"{s3_bucket}/exp"
    fns = Functions()
    fns.crash_in = "c"
    with pytest.raises(Crash):
        run(exp, fns, chain(VALUES))
    runner = run(exp, fns, chain(VALUES))
    assert fns.calls == Counter(a=1, b=1, c=2, d=1) and fns.seen_partial["c"]
    c = chain(VALUES)[2]
    assert runner.results[c.name] == {"total": 111}
    assert runner.url(c) == f"{exp}/{c.path}"
    run(exp, fns, chain(VALUES), resume="never")
    assert fns.calls == Counter(a=1, b=1, c=2, d=1)
