"""The training loader's --cache-dir: an S3 dataset's second epoch comes from the node's
shard cache, not the store (the cache itself: tests/shards/test_cache.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumo.shards.errors import StoreError
from pneumo.shards.s3 import S3Store
from pneumo.training.data import LoaderConfig, train_batches

pytestmark = pytest.mark.integration


def epoch_keys(cfg: LoaderConfig, epoch: int, steps: int) -> list[str]:
    batches = train_batches(
        cfg, rank=0, world_size=1, epoch=epoch, steps_per_epoch=steps, total_steps=2 * steps
    )
    return [k for batch in batches for k in batch["key"]]


def no_s3_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, path: str, *args) -> None:
        raise StoreError(f"read of {path} from S3 while the cache should serve it")

    for name in ("open_read", "open_range", "get"):
        monkeypatch.setattr(S3Store, name, refuse)


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_the_second_epoch_reads_no_shard_from_s3(
    s3_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    cache = str(tmp_path / "cache") if cached else None
    cfg = LoaderConfig(dataset=s3_dataset.url, size=64, batch_size=2,
                       workers=0, cache_dir=cache)  # fmt: skip
    # An epoch longer than a pass: epoch 0 reads every shard.
    steps = len(s3_dataset.keys("train")) // 2 + 1
    first = epoch_keys(cfg, 0, steps)
    assert set(first) == s3_dataset.keys("train")
    with monkeypatch.context() as m:
        no_s3_reads(m)
        if not cached:  # the control: without the cache, epoch 1 must go to S3
            with pytest.raises(StoreError, match="from S3 while the cache"):
                epoch_keys(cfg, 1, steps)
            return
        second = epoch_keys(cfg, 1, steps)
    assert len(second) == 2 * steps
    assert second == epoch_keys(LoaderConfig(**{**cfg.__dict__, "cache_dir": None}), 1, steps)
