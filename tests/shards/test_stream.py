"""The streaming plan: equal batch counts, class mixing, determinism, resume, eval coverage.

The stream never decodes, so the shards here hold small byte strings named after their
keys; ``training/test_data.py`` streams real images.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from pathlib import Path

import boto3
import pytest

from pneumo.shards import manifest, stream
from pneumo.shards import slots as plan
from pneumo.shards.errors import ConfigError, IntegrityError, ManifestError
from pneumo.shards.store import open_store

BATCH = "b0"


def _rows(n_pos: int, n_neg: int, n_unl: int, split: str, start: int) -> list[dict]:
    labels = [True] * n_pos + [False] * n_neg + [None] * n_unl
    return [
        {"key": f"k{start + i:03d}", "image_id": f"1.2.{start + i}", "split": split,
         "has_ptx": has, "age_years": float((start + i) % 90), "dataset": "siim"}
        for i, has in enumerate(labels)
    ]  # fmt: skip


def _members(row: dict) -> dict[str, bytes]:
    """Small byte strings named after the key: the stream never decodes."""
    out = {"jpg": f"img-{row['key']}".encode(), "json": b"{}"}
    if row["has_ptx"]:
        out["mask.png"] = f"mask-{row['key']}".encode()
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory, write_shards) -> dict[str, Path]:
    """``many``: 7 train shards (6 labelled) and 2 val shards; ``one``: similar rows, one shard."""
    base = tmp_path_factory.mktemp("stream")
    many = _rows(10, 22, 3, "train", 0) + _rows(3, 6, 0, "val", 100)
    write_shards(base / "many", many, _members, per_shard=6, one_shard=False)
    one = _rows(4, 8, 1, "train", 0) + _rows(2, 3, 0, "val", 100)
    write_shards(base / "one", one, _members, per_shard=100, one_shard=True)
    return {"many": base / "many", "one": base / "one"}


TRAIN = "split == 'train' and has_ptx is not None"
VAL = "split == 'val'"


def entries(root: Path | str, where: str) -> list[stream.Entry]:
    return stream.entries_from_table(manifest.read(open_store(str(root)), where))


def keys_of(batches) -> list[list[str]]:
    return [[s["__key__"] for s in batch] for _, batch in batches]


def spec(**kw) -> stream.TrainSpec:
    base = dict(epoch=0, batch_size=3, steps_per_epoch=6, total_steps=60, seed=7)
    return stream.TrainSpec(**{**base, **kw})


# ---------------------------------------------------------------- planning


@pytest.mark.parametrize("variant", ["one", "many"])
@pytest.mark.parametrize("pos_rate", [None, (0.7, 0.3)])
def test_every_rank_gets_exactly_steps_per_epoch_full_batches(datasets, variant, pos_rate):
    store = open_store(str(datasets[variant]))
    pools = stream.class_pools(entries(datasets[variant], TRAIN), pos_rate)
    for world in range(1, 5):
        for loader_workers in range(4):
            for rank in range(world):
                s = spec(rank=rank, world_size=world, workers=max(loader_workers, 1),
                         pos_rate=pos_rate, epoch=1)  # fmt: skip
                batches = list(stream.rank_stream(store, pools, s))
                where = f"world {world}, workers {loader_workers}, rank {rank}"
                assert [step for step, _ in batches] == list(range(6)), where
                assert [len(b) for _, b in batches] == [3] * 6, where
                resumed = list(
                    stream.rank_stream(store, pools, spec(**{**s.__dict__, "start_step": 4}))
                )
                assert [step for step, _ in resumed] == [4, 5], where


@pytest.mark.parametrize("variant", ["one", "many"])
def test_eval_slots_are_contiguous_runs_of_equal_size(datasets, variant):
    selected = entries(datasets[variant], TRAIN)
    line = sorted(selected, key=lambda e: (e.shard, e.offset))  # shards end to end, tar order
    for n_slots in range(1, 13):
        slots = plan.assign_slots(selected, n_slots)
        assert [e for s in slots for e in s] == line  # each exactly once, in order
        sizes = [len(s) for s in slots]
        assert max(sizes) - min(sizes) <= 1


def test_passes_cover_the_pool_once_each_in_runs_of_adjacent_samples(datasets):
    selected = entries(datasets["many"], TRAIN)
    n = len(selected)
    seq = [e for run in _take(plan.positions(selected, (5, 1), 0), 4 * n) for e in run]
    runs = list(_take(plan.positions(selected, (5, 1), 0), 10))
    for run in runs:  # one shard each, adjacent samples in tar order
        assert len({e.shard for e in run}) == 1
        assert [e.offset for e in run] == sorted(e.offset for e in run)
        assert all(a.offset + a.size == b.offset for a, b in itertools.pairwise(run))
    for k in range(4):
        assert sorted(seq[k * n : (k + 1) * n]) == sorted(selected), f"pass {k}"
    assert seq[:n] != seq[n : 2 * n]  # every pass its own shard order
    # Any window [start, stop) is that slice of the endless sequence.
    for start, stop in ((0, 5), (7, 40), (n - 3, n + 4), (2 * n + 1, 3 * n + 9)):
        window = [e for run in plan.positions(selected, (5, 1), start, stop) for e in run]
        assert window == seq[start:stop], (start, stop)


def _take(runs, n_samples):
    """Runs from ``runs`` until they hold ``n_samples`` samples."""
    got = 0
    for run in runs:
        yield run
        got += len(run)
        if got >= n_samples:
            return


def test_the_train_stream_yields_only_selected_keys(datasets):
    root = datasets["many"]
    where = f"{TRAIN} and age_years < 20"  # a part of every shard's keys
    selected = {e.key for e in entries(root, where)}
    all_train = {e.key for e in entries(root, TRAIN)}
    assert 0 < len(selected) < len(all_train)
    pools = stream.class_pools(entries(root, where), None)
    seen = set()
    for rank in range(2):
        for _, batch in stream.rank_stream(
            open_store(str(root)), pools, spec(rank=rank, world_size=2)
        ):
            seen.update(s["__key__"] for s in batch)
            assert all(s["jpg"] == f"img-{s['__key__']}".encode() for s in batch)
    assert seen == selected


def test_read_shard_skips_unwanted_members_and_fails_on_missing_ones(datasets):
    root = datasets["one"]
    store = open_store(str(root))
    rows = entries(root, "key >= ''")
    shard = rows[0].shard
    wanted = {e.key: e for e in rows[1::3]}
    wanted["nothere"] = stream.Entry("nothere", shard, "x", False)
    with pytest.raises(IntegrityError, match="nothere"):  # a short read is an error now
        list(stream.read_shard(store, shard, wanted))
    del wanted["nothere"]
    got = list(stream.read_shard(store, shard, wanted))
    assert [s["__key__"] for s in got] == [e.key for e in rows[1::3]]  # tar order
    assert all(
        set(s) <= {"__key__", "__shard__", "__entry__", "jpg", "mask.png", "json"} for s in got
    )


def test_a_stream_whose_keys_are_in_no_shard_fails_instead_of_spinning(datasets):
    store = open_store(str(datasets["one"]))
    shard = entries(datasets["one"], TRAIN)[0].shard
    ghost = {stream.ALL: [stream.Entry("ghost", shard, "g", False)]}
    with pytest.raises(ManifestError, match="disagree"):
        list(stream.rank_stream(store, ghost, spec()))


# ---------------------------------------------------------------- class mixing


@pytest.mark.parametrize("variant", ["one", "many"])
def test_pos_rate_one_and_zero_give_one_class(datasets, variant):
    store = open_store(str(datasets[variant]))
    selected = entries(datasets[variant], TRAIN)
    for rate, expected in (((1.0, 1.0), {True}), ((0.0, 0.0), {False})):
        pools = stream.class_pools(selected, rate)
        got = {
            s["__entry__"].has_ptx
            for _, b in stream.rank_stream(store, pools, spec(pos_rate=rate))
            for s in b
        }
        assert got == expected


def test_pos_rate_half_is_about_half_and_a_sliding_rate_slides(datasets):
    store = open_store(str(datasets["many"]))
    selected = entries(datasets["many"], TRAIN)
    n_steps, batch = 50, 8  # 400 draws: 4 standard deviations of a fair coin is +-0.1
    s = spec(pos_rate=(0.5, 0.5), batch_size=batch, steps_per_epoch=n_steps, total_steps=n_steps)
    flags = [
        x["__entry__"].has_ptx
        for _, b in stream.rank_stream(store, stream.class_pools(selected, s.pos_rate), s)
        for x in b
    ]
    assert abs(sum(flags) / len(flags) - 0.5) < 0.1
    s = spec(pos_rate=(0.95, 0.05), batch_size=batch, steps_per_epoch=n_steps, total_steps=n_steps)
    flags = [
        x["__entry__"].has_ptx
        for _, b in stream.rank_stream(store, stream.class_pools(selected, s.pos_rate), s)
        for x in b
    ]
    quarter = len(flags) // 4
    assert sum(flags[:quarter]) / quarter > 0.75
    assert sum(flags[-quarter:]) / quarter < 0.25
    assert stream.positive_rate(s, n_steps // 2) == pytest.approx(0.5, abs=0.02)


def test_an_empty_class_falls_back_to_the_other_with_a_warning(datasets, caplog):
    negatives = entries(datasets["many"], "split == 'train' and has_ptx == False")
    with caplog.at_level(logging.WARNING, logger="pneumo.shards.stream"):
        pools = stream.class_pools(negatives, (0.8, 0.4))
    assert "no positive samples" in caplog.text
    store = open_store(str(datasets["many"]))
    got = {
        x["__entry__"].has_ptx
        for _, b in stream.rank_stream(store, pools, spec(pos_rate=(0.8, 0.4)))
        for x in b
    }
    assert got == {False}
    with pytest.raises(ConfigError):
        stream.class_pools([], (0.5, 0.5))


# ---------------------------------------------------------------- determinism and resume


def test_same_seed_same_sequence_other_epoch_or_seed_other_order(datasets):
    store = open_store(str(datasets["many"]))
    pools = stream.class_pools(entries(datasets["many"], TRAIN), (0.6, 0.4))

    def run(**kw):
        return keys_of(stream.rank_stream(store, pools, spec(pos_rate=(0.6, 0.4), workers=2, **kw)))

    first = run(epoch=3)
    assert first == run(epoch=3)
    assert first != run(epoch=4)
    assert first != run(epoch=3, seed=8)
    flat = [k for b in first for k in b]
    assert flat != sorted(flat)  # shuffled, not tar order


@pytest.mark.parametrize("variant", ["one", "many"])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_resume_at_step_s_continues_the_uninterrupted_stream(datasets, variant, workers):
    store = open_store(str(datasets[variant]))
    pools = stream.class_pools(entries(datasets[variant], TRAIN), (0.7, 0.3))
    base = dict(
        pos_rate=(0.7, 0.3), workers=workers, rank=1, world_size=2, steps_per_epoch=9, epoch=2
    )
    full = list(stream.rank_stream(store, pools, spec(**base)))
    seeds = lambda batches: [[x["__seed__"] for x in b] for _, b in batches]  # noqa: E731
    for start in (1, 2, 5, 8, 9):
        resumed = list(stream.rank_stream(store, pools, spec(**base, start_step=start)))
        assert keys_of(resumed) == keys_of(full[start:]), f"start {start}"
        assert seeds(resumed) == seeds(full[start:])


def test_spec_rejects_inconsistent_values():
    with pytest.raises(ConfigError):
        spec(rank=2, world_size=2)
    with pytest.raises(ConfigError):
        spec(start_step=7)
    with pytest.raises(ConfigError):
        spec(pos_rate=(0.5, 1.5))
    with pytest.raises(ConfigError):
        list(stream.train_stream(None, {}, spec(workers=2), worker=2))  # type: ignore[arg-type]


# ---------------------------------------------------------------- evaluation


def eval_keys(root: Path | str, world: int, workers: int, batch: int = 4) -> list[list[list[str]]]:
    store = open_store(str(root))
    selected = entries(root, VAL)
    out = []
    for rank in range(world):
        s = stream.EvalSpec(rank=rank, world_size=world, workers=workers, batch_size=batch)
        for w in range(workers):
            out.append(
                [[x["__key__"] for x in b] for b in stream.eval_stream(store, selected, s, w)]
            )
    return out


@pytest.mark.parametrize("variant", ["one", "many"])
def test_eval_covers_every_selected_sample_exactly_once(datasets, variant):
    expected = Counter(e.key for e in entries(datasets[variant], VAL))
    for world in range(1, 5):
        for workers in range(1, 4):
            slots = eval_keys(datasets[variant], world, workers)
            got = Counter(k for slot in slots for b in slot for k in b)
            assert got == expected, f"world {world}, workers {workers}"
            for slot in slots:  # only a slot's last batch may be short
                assert all(len(b) == 4 for b in slot[:-1])
    assert eval_keys(datasets[variant], 2, 2) == eval_keys(datasets[variant], 2, 2)


# ---------------------------------------------------------------- the same from S3


@pytest.fixture
def s3_url(datasets, s3_bucket, s3_endpoint):
    """The ``many`` dataset uploaded to a fresh bucket of the session's S3 server."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    root = datasets["many"]
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"ds/{path.relative_to(root).as_posix()}")
    return f"{s3_bucket}/ds"


@pytest.mark.integration
def test_the_s3_stream_equals_the_local_stream(datasets, s3_url):
    local, s3 = open_store(str(datasets["many"])), open_store(s3_url)
    assert entries(s3_url, TRAIN) == entries(datasets["many"], TRAIN)
    pools = stream.class_pools(entries(s3_url, TRAIN), (0.7, 0.3))
    for rank in range(2):
        s = spec(pos_rate=(0.7, 0.3), workers=2, rank=rank, world_size=2, start_step=2)
        from_s3 = list(stream.rank_stream(s3, pools, s))
        assert keys_of(from_s3) == keys_of(stream.rank_stream(local, pools, s))
        assert len(from_s3) == 4
    assert eval_keys(s3_url, 2, 2) == eval_keys(datasets["many"], 2, 2)
