"""Properties of stream planning on random samples, shards, ranks and workers (hypothesis).

Pure data, no files: entries are made up with a known tar order (their keys sort in
another order), and where a whole stream is run, the shard reader is replaced by one that
hands back the wanted entries in tar order (its contract in ``pneumo.shards.stream``).

* evaluation: the slots' runs, laid end to end, are the selection in shard-path and tar
  order, each sample once, sizes within one;
* training: any window of a pool's sequence of passes is that slice of the sequence (any
  resume point), and each pass holds every sample once; the slots' windows of successive
  epochs tile the sequence, each as long as the draws its batches make; so over all ranks
  and workers every sample is drawn once per pass, and a stream resumed at any step gives
  the uninterrupted stream's batches from that step on.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pneumo.shards import slots, stream
from pneumo.shards.slots import Entry

# A planning bug can loop forever (a run that never shrinks): fail in a minute, not 15.
pytestmark = pytest.mark.timeout(60)

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)


@st.composite
def selections(draw: st.DrawFn, labelled: bool = False) -> list[Entry]:
    """Entries of 1-5 shards of 1-9 samples, shuffled. Within a shard, the tar order
    (increasing offsets) is the order they were made in; keys are drawn at random, so key
    order is not tar order. Paths too are drawn, so path order is not the order made in."""
    paths = draw(st.lists(st.sampled_from("qwertyuiop"), min_size=1, max_size=5, unique=True))
    entries = []
    made = 0
    for path in paths:
        offset = 0
        for _ in range(draw(st.integers(1, 9))):
            key = f"{draw(st.integers(0, 999)):03d}-{made:03d}"  # unique, random order
            has_ptx = draw(st.sampled_from([True, False] if labelled else [True, False, None]))
            size = draw(st.integers(1, 3)) * 512
            entries.append(Entry(key, f"shards/{path}.tar", key, has_ptx, offset, size))
            offset += size
            made += 1
    return draw(st.permutations(entries))


def tar_line(entries: list[Entry]) -> list[Entry]:
    """The selection laid end to end: shards by path, each in offset order."""
    return sorted(entries, key=lambda e: (e.shard, e.offset))


def flat(runs: Iterator[list[Entry]]) -> list[Entry]:
    return [e for run in runs for e in run]


@PROPERTY
@given(selections(), st.integers(1, 12))
def test_eval_slots_read_every_sample_once_in_tar_order(entries: list[Entry], n_slots: int) -> None:
    runs = slots.assign_slots(entries, n_slots)
    assert len(runs) == n_slots
    assert [e for run in runs for e in run] == tar_line(entries)
    sizes = [len(run) for run in runs]
    assert max(sizes) - min(sizes) <= 1
    per_shard = Counter(e.shard for e in entries)
    for run in runs:  # whole shards, and at most two pieces (its first and last)
        pieces = [s for s, n in Counter(e.shard for e in run).items() if n < per_shard[s]]
        assert len(pieces) <= 2


@PROPERTY
@given(selections(), st.integers(0, 2**32 - 1), st.integers(0, 4))
def test_each_pass_holds_every_sample_once_in_shard_runs(
    entries: list[Entry], seed: int, k: int
) -> None:
    n = len(entries)
    runs = list(slots.positions(entries, (seed, 1), k * n, (k + 1) * n))
    assert sorted(flat(iter(runs))) == sorted(entries)
    line = tar_line(entries)
    for run in runs:  # each run: adjacent samples of one shard, in tar order
        assert len({e.shard for e in run}) == 1
        i = line.index(run[0])
        assert line[i : i + len(run)] == run
    # Cut into pieces of PIECE samples (a shard's last one shorter): a pass reads each
    # piece once, as one run, and pieces of one shard come in no fixed order.
    per_shard = Counter(e.shard for e in entries)
    assert len(runs) == sum(-(-n // slots.PIECE) for n in per_shard.values())
    assert all(len(run) <= slots.PIECE for run in runs)
    first = {e.shard: line.index(e) for e in reversed(line)}  # each shard's first sample
    piece_starts = [i for i, e in enumerate(line) if (i - first[e.shard]) % slots.PIECE == 0]
    assert sorted(line.index(run[0]) for run in runs) == piece_starts


def test_a_shard_without_byte_spans_is_one_piece() -> None:
    """Schema-1 rows have no spans: such a shard is streamed whole, so cutting it into
    pieces would stream it once per piece."""
    spanned = [Entry(f"a{i}", "shards/a.tar", f"a{i}", True, 512 * i, 512) for i in range(5)]
    legacy = [Entry(f"b{i}", "shards/b.tar", f"b{i}", True) for i in range(5)]
    cut = slots.pieces(spanned + legacy, 2)
    assert [[e.key for e in run] for run in cut] == [
        ["a0", "a1"], ["a2", "a3"], ["a4"], ["b0", "b1", "b2", "b3", "b4"]
    ]  # fmt: skip


@PROPERTY
@given(selections(), st.integers(0, 2**32 - 1), st.data())
def test_any_window_is_that_slice_of_the_sequence(
    entries: list[Entry], seed: int, data: st.DataObject
) -> None:
    n = len(entries)
    stop = data.draw(st.integers(0, 4 * n))
    start = data.draw(st.integers(0, stop))
    whole = flat(slots.positions(entries, (seed, 1), 0, stop))
    assert len(whole) == stop
    assert flat(slots.positions(entries, (seed, 1), start, stop)) == whole[start:]
    endless = slots.positions(entries, (seed, 1), start)
    got: list[Entry] = []
    while len(got) < stop - start:
        got += next(endless)
    assert got[: stop - start] == whole[start:]


@st.composite
def plans(draw: st.DrawFn) -> tuple[dict[str, list[Entry]], stream.TrainSpec, int]:
    """Pools (one, positives and negatives with a pos_rate, or N classes), a spec at
    epoch 0, and a number of epochs."""
    kind = draw(st.sampled_from(["all", "pos_rate", "classes"]))
    entries = draw(selections(labelled=kind == "pos_rate"))
    pos_rate = None
    if kind == "all":
        pools = stream.class_pools(entries, None)
    elif kind == "pos_rate":
        pos_rate = (draw(st.sampled_from([0, 0.3, 0.5, 1])), draw(st.sampled_from([0, 0.4, 1])))
        pools = stream.class_pools(entries, pos_rate)
        if stream.ALL in pools:
            pos_rate = None  # one class is empty: the stream falls back to all
    else:
        k = draw(st.integers(2, 3))
        pools = {f"c{i}": [e for j, e in enumerate(entries) if j % k == i] for i in range(k)}
        pools = {name: pool for name, pool in pools.items() if pool}
    epochs = draw(st.integers(1, 3))
    steps = draw(st.integers(1, 5))
    spec = stream.TrainSpec(
        seed=draw(st.integers(0, 2**32 - 1)),
        epoch=0,
        world_size=draw(st.integers(1, 3)),
        workers=draw(st.integers(1, 3)),
        batch_size=draw(st.integers(1, 4)),
        steps_per_epoch=steps,
        total_steps=draw(st.integers(1, epochs * steps)),
        pos_rate=pos_rate,
        shuffle_buffer=draw(st.integers(1, 8)),
        piece=draw(st.integers(1, 4)),
    )
    return pools, spec, epochs


@PROPERTY
@given(plans())
def test_slot_windows_tile_the_passes_and_match_the_draws(
    plan: tuple[dict[str, list[Entry]], stream.TrainSpec, int],
) -> None:
    pools, spec, epochs = plan
    classes = sorted(pools)
    n_slots = spec.world_size * spec.workers
    for name in classes:
        windows = []
        for epoch in range(epochs):
            for slot in range(n_slots):
                rank, worker = divmod(slot, spec.workers)
                at = replace(spec, epoch=epoch, rank=rank)
                start, count = stream.slot_window(at, name, slot, classes)
                # A resumed rank plans the same windows.
                resumed = replace(at, start_step=spec.steps_per_epoch)
                assert stream.slot_window(resumed, name, slot, classes) == (start, count)
                made = sum(
                    stream.batch_draws(at, step, pools)[0].count(name)
                    for step in range(worker, spec.steps_per_epoch, spec.workers)
                )
                assert count == made, (epoch, slot, name)
                windows.append((start, count))
        # Successive (epoch, slot) windows tile the sequence from position 0.
        ends = [0]
        for start, count in windows:
            assert start == ends[-1]
            ends.append(start + count)
        # So every sample is drawn once per pass: count ``total // n`` or one more.
        total, n = ends[-1], len(pools[name])
        tag = classes.index(name) + 1  # the pool's seeds in train_stream
        drawn = Counter(
            flat(slots.positions(pools[name], (spec.seed, tag), 0, total, piece=spec.piece))
        )
        assert set(drawn) <= set(pools[name])
        assert all(total // n <= drawn[e] <= total // n + 1 for e in pools[name])
        assert sum(drawn.values()) == total


def fake_read_shard(store: object, path: str, wanted: Mapping[str, Entry]) -> Iterator[dict]:
    """The reader's contract without bytes: the wanted samples of one shard, in tar order."""
    for e in sorted(wanted.values(), key=slots.place):
        assert e.shard == path
        yield {"__key__": e.key, "__entry__": e}


def counting_reader(read: Counter[str]):
    """:func:`fake_read_shard`, counting in ``read`` each sample it hands back."""

    def read_shard(store: object, path: str, wanted: Mapping[str, Entry]) -> Iterator[dict]:
        for sample in fake_read_shard(store, path, wanted):
            read[sample["__key__"]] += 1
            yield sample

    return read_shard


def keys_and_seeds(batches: list[tuple[int, list[dict]]]) -> list[tuple[int, list]]:
    return [(step, [(s["__key__"], s["__seed__"]) for s in batch]) for step, batch in batches]


@PROPERTY
@given(plans(), st.data())
def test_streams_draw_every_sample_once_per_pass_and_resume_anywhere(
    plan: tuple[dict[str, list[Entry]], stream.TrainSpec, int], data: st.DataObject
) -> None:
    pools, spec, epochs = plan
    by_key = {e.key: name for name, pool in pools.items() for e in pool}
    drawn: Counter[str] = Counter()
    with mock.patch.object(stream, "read_shard", fake_read_shard):
        for epoch in range(epochs):
            for rank in range(spec.world_size):
                at = replace(spec, epoch=epoch, rank=rank)
                batches = keys_and_seeds(list(stream.rank_stream(None, pools, at)))  # type: ignore[arg-type]
                assert [step for step, _ in batches] == list(range(spec.steps_per_epoch))
                assert all(len(b) == spec.batch_size for _, b in batches)
                drawn.update(key for _, b in batches for key, _ in b)
                s = data.draw(st.integers(0, spec.steps_per_epoch), label="resume step")
                resumed = replace(at, start_step=s)
                read: Counter[str] = Counter()
                with mock.patch.object(stream, "read_shard", counting_reader(read)):
                    got = keys_and_seeds(list(stream.rank_stream(None, pools, resumed)))  # type: ignore[arg-type]
                assert got == batches[s:]
                # What was drawn before the resume is skipped, not read: the resumed stream
                # reads exactly the samples it gives, each draw once.
                assert read == Counter(key for _, b in got for key, _ in b)
    for name, pool in pools.items():
        total = sum(drawn[e.key] for e in pool)
        assert all(total // len(pool) <= drawn[e.key] <= total // len(pool) + 1 for e in pool)
        assert sum(n for key, n in drawn.items() if by_key[key] == name) == total


@PROPERTY
@given(selections(), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4))
def test_eval_streams_give_every_sample_once(
    entries: list[Entry], world: int, workers: int, batch_size: int
) -> None:
    got: list[str] = []
    with mock.patch.object(stream, "read_shard", fake_read_shard):
        for rank in range(world):
            spec = stream.EvalSpec(
                rank=rank, world_size=world, workers=workers, batch_size=batch_size
            )
            for worker in range(workers):
                batches = list(stream.eval_stream(None, entries, spec, worker))  # type: ignore[arg-type]
                assert all(len(b) == batch_size for b in batches[:-1])
                got += [s["__key__"] for b in batches for s in b]
    assert got == [e.key for e in tar_line(entries)]


@PROPERTY
@given(
    st.tuples(st.floats(0, 1), st.floats(0, 1)),
    st.integers(1, 3),  # workers
    st.integers(1, 8),  # batch size
    st.integers(1, 6),  # steps per epoch
    st.integers(0, 3),  # epoch
    st.integers(1, 30),  # total steps
)
@example((0.5, 0.0), 1, 3, 2, 1, 3)  # the case the stream property found
def test_a_workers_positives_per_batch_add_up_to_its_planned_draws(
    pos_rate: tuple[float, float], workers: int, batch: int, spe: int, epoch: int, total: int
) -> None:
    """Any rates (not only round ones): every batch has 0..batch_size positives, and a
    worker's batches together draw what its window was planned for. Found by this file's
    stream property: with float sums, pos_rate (0.5, 0), 3 total steps, batch 3 gave epoch
    1's second batch -1 positives (two, as a slice [:-1]), and the stream ran dry."""
    spec = stream.TrainSpec(
        epoch=epoch, workers=workers, batch_size=batch, steps_per_epoch=spe,
        total_steps=total, pos_rate=pos_rate,
    )  # fmt: skip
    pools = {stream.POS: [], stream.NEG: []}
    for worker in range(workers):
        counts = [
            stream.batch_draws(spec, step, pools)[0].count(stream.POS)
            for step in range(worker, spe, workers)
        ]
        assert all(0 <= c <= batch for c in counts)
        assert sum(counts) == stream.draws(spec, stream.POS, epoch, worker)
        # Within one of the rate at every step, as the stream's doc promises.
        for c, step in zip(counts, range(worker, spe, workers), strict=True):
            assert abs(c - batch * stream.positive_rate(spec, step)) < 1 + 1e-9


@PROPERTY
@given(st.integers(0, 60), st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_a_shuffle_order_is_a_permutation_that_holds_at_most_size_items(
    count: int, size: int, seed: int
) -> None:
    order = list(stream.shuffle_order(count, size, np.random.default_rng(seed)))
    assert sorted(order) == list(range(count))
    # The k-th item handed on was among the first k + size read: the buffer never holds
    # more than ``size`` samples.
    assert all(item < k + size for k, item in enumerate(order))


def test_a_shuffle_order_of_an_endless_epoch_starts_at_once() -> None:
    """bench_loader trains one epoch of 2**40 steps: the order is worked out as it goes."""
    order = stream.shuffle_order(1 << 45, 512, np.random.default_rng(0))
    first = list(itertools.islice(order, 1000))
    assert len(set(first)) == 1000 and max(first) < 1000 + 512
