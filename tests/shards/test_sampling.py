"""Uniform sampling: every selected sample is drawn at the same rate, whatever its shard.

The datasets here hold one-byte samples: the stream never decodes, and 20 epochs of a
2,024-sample selection must read fast.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pneumo.shards import manifest, stream
from pneumo.shards.store import open_store

EPOCHS = 20
BATCH = 8


@pytest.fixture(scope="module")
def tail_dataset(tmp_path_factory: pytest.TempPathFactory, write_shards) -> Path:
    """1,012 positives and 1,012 negatives: per class a 1,000-sample shard and a 12-sample
    tail shard, the way every incremental ingest batch leaves one."""
    root = tmp_path_factory.mktemp("tail") / "ds"
    rows = [
        {"key": f"{c}{i:04d}", "image_id": f"{c}.{i}", "split": "train",
         "has_ptx": c == "p", "dataset": "siim"}
        for c in "pn" for i in range(1012)
    ]  # fmt: skip
    write_shards(root, rows, lambda row: {"jpg": b"x"}, per_shard=1000, one_shard=False)
    return root


@pytest.mark.parametrize(
    ("pos_rate", "world", "workers"),
    [(None, 2, 2), ((0.7, 0.3), 1, 2), ((0.7, 0.3), 3, 3)],
)
def test_a_tail_shard_is_drawn_at_the_rate_of_the_others(tail_dataset, pos_rate, world, workers):
    store = open_store(str(tail_dataset))
    selected = stream.entries_from_table(manifest.read(store))
    shard_sizes = Counter(e.shard for e in selected)
    assert sorted(shard_sizes.values()) == [12, 12, 1000, 1000]
    pools = stream.class_pools(selected, pos_rate)
    steps = len(selected) // (BATCH * world)
    drawn: Counter[str] = Counter()
    for epoch in range(EPOCHS):
        for rank in range(world):
            spec = stream.TrainSpec(
                seed=3, epoch=epoch, rank=rank, world_size=world, workers=workers,
                batch_size=BATCH, steps_per_epoch=steps, total_steps=steps * EPOCHS,
                pos_rate=pos_rate,
            )  # fmt: skip
            batches = list(stream.rank_stream(store, pools, spec))
            assert [step for step, _ in batches] == list(range(steps))  # every rank, every step
            drawn.update(s["__key__"] for _, batch in batches for s in batch)
    for label in (True, False):  # with a pos_rate the classes differ: compare within each
        rows = [e for e in selected if e.has_ptx is label]
        mean = sum(drawn[e.key] for e in rows) / len(rows)
        for shard in sorted({e.shard for e in rows}):
            in_shard = [drawn[e.key] for e in rows if e.shard == shard]
            rate = sum(in_shard) / len(in_shard) / mean
            assert 0.9 <= rate <= 1.1, f"{shard} ({len(in_shard)} samples): {rate:.2f}x the mean"
        # Stronger than the rate: a sample is drawn once per pass over its class.
        counts = [drawn[e.key] for e in rows]
        assert max(counts) - min(counts) <= 1, (min(counts), max(counts))


def _spec(**kw) -> stream.TrainSpec:
    base = dict(seed=1, epoch=0, batch_size=5, steps_per_epoch=23, total_steps=23 * 6)
    return stream.TrainSpec(**{**base, **kw})


@pytest.mark.parametrize("pos_rate", [(0.8, 0.4), (0.1, 0.9), (0.5, 0.5), (1.0, 0.0)])
def test_each_workers_positives_follow_the_rate_and_add_up_to_its_draws(pos_rate):
    pools = {stream.POS: [], stream.NEG: []}
    for epoch in (0, 2, 5, 7):  # the slide ends after epoch 5: the rate is flat at epoch 7
        for workers in (1, 3, 4):
            spec = _spec(epoch=epoch, workers=workers, pos_rate=pos_rate)
            per_worker = Counter()
            for step in range(spec.steps_per_epoch):
                names, _ = stream.batch_draws(spec, step, pools)
                n_pos = names.count(stream.POS)
                # Within one of batch_size * rate, not a coin flip per sample.
                assert abs(n_pos - spec.batch_size * stream.positive_rate(spec, step)) < 1
                per_worker[step % workers] += n_pos
            for w in range(workers):
                assert stream.draws(spec, stream.POS, epoch, w) == per_worker[w]
                n = spec.batch_size * len(range(w, spec.steps_per_epoch, workers))
                assert stream.draws(spec, stream.NEG, epoch, w) == n - per_worker[w]


def test_slot_windows_tile_each_pool_epoch_after_epoch():
    """Every draw of every slot takes the next position: no gap, no overlap."""
    for pool, pos_rate in ((stream.ALL, None), (stream.POS, (0.9, 0.2)), (stream.NEG, (0.9, 0.2))):
        covered = []
        for epoch in range(4):
            for slot in range(2 * 3):
                spec = _spec(epoch=epoch, world_size=2, workers=3, pos_rate=pos_rate)
                start, count = stream.slot_window(spec, pool, slot)
                assert count == stream.draws(spec, pool, epoch, slot % 3)
                covered.append((start, start + count))
        assert covered[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False)), pool
