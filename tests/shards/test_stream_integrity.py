"""The training and evaluation stream checks every sample as it reads it: flipped image bytes,
a shard cut at a sample boundary or inside a sample, and a deleted shard each stop it with one
line naming the shard and the key, in-process and from a DataLoader worker, never a smaller
or changed set of samples.

The damage is done to a copy of the real-image dataset of tests/stream_datasets.py with plain
file operations, its places found with ``tarfile`` (tests/shard_damage.py).
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import shard_damage as damage

from pneumo.render import error_line
from pneumo.shards import manifest, stream
from pneumo.shards.errors import IntegrityError
from pneumo.shards.store import open_store
from pneumo.training.data import LoaderConfig, eval_batches


@pytest.fixture
def copy(dataset, tmp_path: Path) -> Path:
    return damage.copy_dataset(dataset.url, tmp_path / "ds")


def _entries(root: str | Path) -> list[stream.Entry]:
    return stream.entries_from_table(manifest.read(open_store(str(root), create=False)))


def _evaluate(root: str | Path, store=None) -> list[str]:
    """Every selected sample through the evaluation stream (two slots); their keys."""
    store = store or open_store(str(root), create=False)
    entries, spec = _entries(root), stream.EvalSpec(batch_size=4, workers=2)
    return [s["__key__"] for w in range(2) for b in stream.eval_stream(store, entries, spec, w)
            for s in b]  # fmt: skip


def _train(root: Path) -> list[str]:
    """One pass over every sample through the training stream; their keys."""
    entries = _entries(root)
    spec = stream.TrainSpec(epoch=0, batch_size=4, steps_per_epoch=len(entries) // 4,
                            total_steps=len(entries) // 4, workers=2)  # fmt: skip
    store = open_store(str(root), create=False)
    return [s["__key__"] for _, b in stream.rank_stream(store, {stream.ALL: entries}, spec)
            for s in b]  # fmt: skip


def _names(error: pytest.ExceptionInfo, root: Path, shard: str, key: str) -> bool:
    message = str(error.value)
    return "\n" not in message and str(root / shard) in message and f"sample {key}" in message


def _row(dataset, **match) -> dict:
    return next(r for r in dataset.rows if all(r[k] == v for k, v in match.items()))


def test_a_clean_dataset_streams_every_sample_once(dataset) -> None:
    assert sorted(_evaluate(dataset.url)) == sorted(r["key"] for r in dataset.rows)
    assert sorted(_train(Path(dataset.url))) == sorted(r["key"] for r in dataset.rows)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_flipped_image_bytes_stop_both_streams(dataset, copy: Path, fmt: str) -> None:
    row = _row(dataset, image_format=fmt)
    damage.flip_image_bytes(copy / row["shard"], row["key"])
    for read in (_evaluate, _train):
        with pytest.raises(IntegrityError, match="sha256") as error:
            read(copy)
        assert _names(error, copy, row["shard"], row["key"])


def test_a_shard_cut_at_a_sample_boundary_stops_the_stream(dataset, copy: Path) -> None:
    shard = next(s for s in sorted({r["shard"] for r in dataset.rows})
                 if len(damage.keys_in(copy / s)) >= 3)  # fmt: skip
    cut = damage.truncate_before_sample(copy / shard, damage.keys_in(copy / shard)[1])
    with pytest.raises(IntegrityError) as error:
        _evaluate(copy)
    assert _names(error, copy, shard, cut[0])
    with pytest.raises(IntegrityError) as error:
        _train(copy)
    assert str(copy / shard) in str(error.value)


def test_a_shard_cut_inside_an_image_stops_the_stream(dataset, copy: Path) -> None:
    shard = next(s for s in sorted({r["shard"] for r in dataset.rows})
                 if len(damage.keys_in(copy / s)) >= 3)  # fmt: skip
    key = damage.keys_in(copy / shard)[1]
    damage.truncate_inside_image(copy / shard, key)
    with pytest.raises(IntegrityError, match="cut short") as error:
        _evaluate(copy)
    assert _names(error, copy, shard, key)


def test_a_sample_that_lost_its_mask_stops_the_stream(dataset, copy: Path) -> None:
    """Cut at a member boundary inside a sample: the image is whole, the mask gone. Read
    as it is, the positive would be trained on, and scored, as empty."""
    row = _row(dataset, image_format="jpeg", has_ptx=True)
    damage.truncate_before(copy / row["shard"], f"{row['key']}.mask.png")
    with pytest.raises(IntegrityError, match="incomplete") as error:
        _evaluate(copy)
    assert _names(error, copy, row["shard"], row["key"])


def test_a_deleted_shard_stops_the_stream(dataset, copy: Path) -> None:
    shard = dataset.rows[0]["shard"]
    first = damage.keys_in(copy / shard)[0]
    (copy / shard).unlink()
    with pytest.raises(IntegrityError, match="does not exist") as error:
        _evaluate(copy)
    assert _names(error, copy, shard, first)


def test_a_sample_not_where_the_manifest_says_stops_the_stream(dataset) -> None:
    """A row whose span holds another key's sample, and one without a span whose key the
    shard lacks: neither is skipped."""
    store = open_store(dataset.url, create=False)
    entry = _entries(dataset.url)[0]
    elsewhere = entry._replace(key="ghost")
    for wanted in ({"ghost": elsewhere}, {"ghost": elsewhere._replace(offset=None, size=None)}):
        with pytest.raises(IntegrityError, match="not in the shard") as error:
            list(stream.read_shard(store, entry.shard, wanted))
        assert _names(error, Path(dataset.url), entry.shard, "ghost")


def test_an_error_in_a_loader_worker_is_one_line(dataset, copy: Path) -> None:
    """torch re-raises a worker's exception with the worker's traceback as its message; the
    CLI's line for it (``pneumo.render.error_line``) is the worker's own, naming shard and key."""
    row = _row(dataset, image_format="jpeg", split="val")
    damage.flip_image_bytes(copy / row["shard"], row["key"])
    cfg = LoaderConfig(dataset=str(copy), size=32, batch_size=4, workers=1, augment=False,
                       where="split == 'val'")  # fmt: skip
    with pytest.raises(IntegrityError) as error:
        list(eval_batches(cfg, rank=0, world_size=1))
    assert "DataLoader worker" in str(error.value)  # it did come from a worker
    line = error_line(error.value)
    assert line is not None and "\n" not in line and "sha256" in line
    assert str(copy / row["shard"]) in line and f"sample {row['key']}" in line


@pytest.mark.integration
def test_s3_shards_cut_or_deleted_stop_the_stream(dataset, copy: Path, s3_bucket: str) -> None:
    """On S3 a read that starts past a cut shard's end is refused (416), not short."""
    shards = sorted({r["shard"] for r in dataset.rows})
    cut_shard = next(s for s in shards if len(damage.keys_in(copy / s)) >= 2)
    cut = damage.truncate_before_sample(copy / cut_shard, damage.keys_in(copy / cut_shard)[1])
    client = boto3.client("s3")
    for path in sorted(p for p in copy.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_bucket[5:], f"ds/{path.relative_to(copy).as_posix()}")
    store = open_store(f"{s3_bucket}/ds", create=False)
    entries = {e.key: e for e in _entries(copy) if e.shard == cut_shard and e.key in cut}
    with pytest.raises(IntegrityError, match="ends before") as error:
        list(stream.read_shard(store, cut_shard, entries))
    assert cut_shard in str(error.value) and f"sample {cut[0]}" in str(error.value)

    gone = next(s for s in shards if s != cut_shard)
    client.delete_object(Bucket=s3_bucket[5:], Key=f"ds/{gone}")
    wanted = {e.key: e for e in _entries(copy) if e.shard == gone}
    with pytest.raises(IntegrityError, match="does not exist") as error:
        list(stream.read_shard(store, gone, wanted))
    assert gone in str(error.value)


class _RangeRefused:
    """A store whose reads fail the way boto3 reports S3 errors: a StoreError raised from a
    ClientError whose response carries the error code."""

    def __init__(self, code: str | None, response: object = "client-error"):
        self.code, self.response = code, response

    def url_of(self, path: str) -> str:
        return f"s3://bucket/{path}"

    def exists(self, path: str) -> bool:
        return True

    def open_range(self, path: str, start: int, end: int):
        from botocore.exceptions import ClientError

        from pneumo.shards.errors import StoreError

        if self.response == "client-error":
            cause: BaseException = ClientError(
                {"Error": {"Code": self.code, "Message": "m"}}, "GetObject"
            )
        elif self.response == "absent":
            cause = OSError("connection reset")  # a cause with no response at all
        else:
            cause = RuntimeError("no response")
            cause.response = self.response  # type: ignore[attr-defined]
        raise StoreError(f"{path}: read failed") from cause

    open_read = open_range


def _one_entry() -> dict[str, stream.Entry]:
    return {"k1": stream.Entry("k1", "s.tar", "img1", True, offset=4096, size=512)}


def test_a_range_past_the_end_of_a_shard_is_damage_and_other_s3_errors_are_not():
    with pytest.raises(IntegrityError, match="s3://bucket/s.tar: the shard ends before sample k1"):
        list(stream.read_shard(_RangeRefused("InvalidRange"), "s.tar", _one_entry()))
    for store in (
        _RangeRefused("AccessDenied"),
        _RangeRefused("invalidrange"),
        _RangeRefused(None, response={"Code": "InvalidRange"}),  # no "Error" level
        _RangeRefused(None, response=None),
        _RangeRefused(None, response="absent"),
        _RangeRefused(None, response=[("Error", {"Code": "InvalidRange"})]),
    ):
        with pytest.raises(Exception) as e:
            list(stream.read_shard(store, "s.tar", _one_entry()))
        assert type(e.value).__name__ == "StoreError", (store.code, store.response)
