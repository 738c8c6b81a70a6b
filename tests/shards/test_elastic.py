"""A run resumed on another layout (pneumo.shards.elastic): whatever the new numbers of
ranks and workers, and wherever the resume, the ranks' parts of every step put together
are the planned step's samples and seeds, in plan rank order. So every pass still gives
every sample once, and each step trains what the uninterrupted run would have."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import replace
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumo.shards import elastic, manifest, slots, stream
from pneumo.shards.errors import ConfigError
from pneumo.shards.slots import Entry
from pneumo.shards.store import open_store

pytestmark = pytest.mark.timeout(120)
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


def fake_read_shard(store: object, path: str, wanted: Mapping[str, Entry]) -> Iterator[dict]:
    """The reader's contract without bytes (pneumo.shards.stream.read_shard's)."""
    for e in sorted(wanted.values(), key=slots.place):
        assert e.shard == path
        yield {"__key__": e.key}


def entries(n: int, per_shard: int, labelled: bool) -> list[Entry]:
    return [
        Entry(f"k{i:03d}", f"s/{i // per_shard}.tar", f"k{i:03d}", (i % 3 == 0) if labelled
              else True, 512 * (i % per_shard), 512)
        for i in range(n)
    ]  # fmt: skip


@st.composite
def layouts(draw: st.DrawFn):
    """Pools (all, positives and negatives with a pos_rate, or N classes drawn in turn), a
    plan, a new layout whose ranks can share a step, and a resume step."""
    kind = draw(st.sampled_from(["all", "pos_rate", "classes"]))
    pos_rate = (0.6, 0.2) if kind == "pos_rate" else None
    pool = entries(draw(st.integers(3, 30)), draw(st.integers(1, 7)), pos_rate is not None)
    pools = stream.class_pools(pool, pos_rate)
    if kind == "classes":
        pools = {f"c{i}": pool[i::3] for i in range(3)}
    if stream.ALL in pools:
        pos_rate = None
    plan_world, batch = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    divisors = [w for w in range(1, 5) if (plan_world * batch) % w == 0]
    spe = draw(st.integers(1, 6))
    plan = stream.TrainSpec(
        seed=draw(st.integers(0, 99)), epoch=draw(st.integers(0, 2)), world_size=plan_world,
        workers=draw(st.integers(1, 3)), batch_size=batch, steps_per_epoch=spe,
        total_steps=3 * spe, pos_rate=pos_rate, shuffle_buffer=draw(st.integers(1, 6)),
        piece=draw(st.integers(1, 3)),
    )  # fmt: skip
    world, workers = draw(st.sampled_from(divisors)), draw(st.integers(1, 3))
    return pools, plan, world, workers, draw(st.integers(0, spe))


def keyed(batches) -> dict[int, list[tuple[str, int]]]:
    return {j: [(s["__key__"], s["__seed__"]) for s in b] for j, b in batches}


@PROPERTY
@given(layouts())
def test_the_ranks_parts_put_together_are_the_planned_steps(layout) -> None:
    pools, plan, world, workers, resume = layout
    with mock.patch.object(stream, "read_shard", fake_read_shard):
        planned: dict[int, list] = {}
        for rank in range(plan.world_size):  # the uninterrupted run, rank by rank
            for j, b in keyed(stream.rank_stream(None, pools, replace(plan, rank=rank))).items():
                planned.setdefault(j, []).extend(b)
        now = replace(plan, world_size=world, workers=workers, start_step=resume,
                      plan_world_size=plan.world_size, plan_workers=plan.workers)  # fmt: skip
        parts: dict[int, list] = {}
        for rank in range(world):
            got = keyed(elastic.rank_stream(None, pools, replace(now, rank=rank)))
            assert list(got) == list(range(resume, plan.steps_per_epoch))
            for j, b in got.items():
                assert len(b) == plan.world_size * plan.batch_size // world
                parts.setdefault(j, []).extend(b)
    assert parts == {j: b for j, b in planned.items() if j >= resume}


def test_a_resume_reads_only_the_samples_of_its_part() -> None:
    """1 -> 3 ranks at step 2: each rank reads its third of each later step, nothing else."""
    pools = {stream.ALL: entries(24, 6, False)}
    plan = stream.TrainSpec(epoch=0, batch_size=6, steps_per_epoch=4, total_steps=4)
    read: Counter[str] = Counter()

    def counting(store, path, wanted):
        for sample in fake_read_shard(store, path, wanted):
            read[sample["__key__"]] += 1
            yield sample

    given_keys: Counter[str] = Counter()
    with mock.patch.object(stream, "read_shard", counting):
        for rank in range(3):
            now = replace(plan, rank=rank, world_size=3, start_step=2, plan_world_size=1,
                          plan_workers=1)  # fmt: skip
            for _, b in elastic.rank_stream(None, pools, now):
                given_keys.update(s["__key__"] for s in b)
    assert read == given_keys and sum(read.values()) == 2 * 6


def test_a_step_that_cannot_be_shared_evenly_is_refused() -> None:
    with pytest.raises(ConfigError, match="16 images cannot be shared evenly by 3"):
        stream.TrainSpec(epoch=0, world_size=3, batch_size=8, steps_per_epoch=2,
                         total_steps=2, plan_world_size=2)  # fmt: skip


def test_a_worker_outside_the_layout_is_refused() -> None:
    spec = stream.TrainSpec(epoch=0, world_size=2, workers=2, batch_size=2, steps_per_epoch=2,
                            total_steps=2, plan_world_size=1)  # fmt: skip
    with pytest.raises(ConfigError, match="worker 2 is not within 2 workers"):
        next(elastic.train_stream(None, {stream.ALL: entries(4, 2, False)}, spec, 2))


@pytest.mark.parametrize("layout", [(1, 1), (2, 2)], ids=["planned", "elastic"])
def test_real_shards_give_the_planned_samples(tmp_path, write_shards, layout) -> None:
    """Through a real store (bytes read, hashes checked): 2 ranks of 1 worker planned, read
    as planned or on 1 rank of 2 workers, give the same keys per step."""
    rows = [{"key": f"k{i:02d}", "image_id": f"k{i:02d}", "split": "train", "has_ptx": False,
             "dataset": "siim"} for i in range(12)]  # fmt: skip
    write_shards(tmp_path, rows, lambda r: {"jpg": r["key"].encode() * 50, "json": b"{}"},
                 per_shard=5, one_shard=False)  # fmt: skip
    store = open_store(str(tmp_path), create=False)
    pools = {stream.ALL: stream.entries_from_table(manifest.read(store, None))}
    plan = stream.TrainSpec(epoch=1, world_size=2, batch_size=2, steps_per_epoch=3,
                            total_steps=6)  # fmt: skip
    want: dict[int, list] = {}
    for rank in range(2):
        for j, b in stream.rank_stream(store, pools, replace(plan, rank=rank)):
            want.setdefault(j, []).extend(s["__key__"] for s in b)
    world, workers = (2, 1) if layout == (1, 1) else (1, 2)
    got: dict[int, list] = {}
    for rank in range(world):
        now = replace(plan, rank=rank, world_size=world, workers=workers, plan_world_size=2,
                      plan_workers=1)  # fmt: skip
        for j, b in elastic.rank_stream(store, pools, now):
            assert all(s["jpg"] == s["__key__"].encode() * 50 for s in b)  # the real bytes
            got.setdefault(j, []).extend(s["__key__"] for s in b)
    assert got == want
