"""Filtered reads of a relabelled dataset: one row per image, its latest labels, whatever the
filter, the columns asked for, or the table's layout (Delta, or the legacy hive parts that
kept every labels version as a row); an older version gives the labels it had then."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pneumo.ingest.batch import BatchConfig
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import layout, manifest
from pneumo.shards.store import open_store


def _csv(text: str) -> list[tuple[str, str]]:
    lines = text.lstrip("\ufeff").splitlines()
    return [(i.strip(), rle.strip()) for i, rle in (line.split(",", 1) for line in lines if line)]


def _positives(rows: list[tuple[str, str]]) -> set[str]:
    """Images with a row whose RLE is not -1."""
    return {i for i, rle in rows if rle not in ("-1", "")}


class _Relabelled:
    """The SIIM sample ingested, then relabelled: ``positive`` became negative and
    ``negative`` got the positive's mask. ``legacy`` is the same dataset in the hive
    Parquet layout of old, with both labels versions of the two images as rows."""

    def __init__(self, root: Path, sample: Path) -> None:
        rows = _csv((sample / "train-rle-sample.csv").read_text(encoding="utf-8"))
        self.ids = {i for i, _ in rows}
        self.before = _positives(rows)
        self.positive = sorted(self.before)[0]
        self.negative = sorted(self.ids - self.before)[0]
        fixed = [(i, r) for i, r in rows if i not in (self.positive, self.negative)]
        fixed += [(self.positive, "-1")]
        fixed += [(self.negative, r) for i, r in rows if i == self.positive]
        self.after = _positives(fixed)
        assert self.after == self.before - {self.positive} | {self.negative}
        labels = root / "fixed.csv"
        labels.write_text("".join(f"{i},{r}\n" for i, r in fixed))

        self.out = root / "delta"
        first = BatchConfig(out=str(self.out), batch="first")
        ingest_siim(
            SiimConfig(dicom_root=str(sample), labels=sample / "train-rle-sample.csv", batch=first)
        )
        fix = BatchConfig(out=str(self.out), batch="fix", relabel=True)
        summary = ingest_siim(SiimConfig(dicom_root=str(sample), labels=labels, batch=fix))
        assert (summary.ingested, summary.relabelled) == (2, 2)
        assert summary.version is not None
        self.version = summary.version
        self.legacy = root / "legacy"
        self._write_legacy()

    def _write_legacy(self) -> None:
        shutil.copytree(self.out, self.legacy)
        store = open_store(self.out)
        old = manifest.read(store, version=self.version - 1).to_pylist()
        new = [
            r
            for r in manifest.read(store).to_pylist()
            if r["image_id"] in (self.positive, self.negative)
        ]
        assert {r["labels_version"] for r in old} == {1} and {r["labels_version"] for r in new} == {
            2
        }
        shutil.rmtree(self.legacy / layout.MANIFEST_DIR)
        shutil.rmtree(self.legacy / layout.QUARANTINE_DIR, ignore_errors=True)
        for batch, mine in (("first", old), ("fix", new)):
            assert {r["batch"] for r in mine} == {batch}
            part = self.legacy / layout.MANIFEST_DIR / "dataset=siim" / f"batch={batch}"
            part.mkdir(parents=True)
            table = manifest.to_table(mine).drop_columns(["dataset", "batch"])
            pq.write_table(table, part / "part-0.parquet")
        assert manifest.is_legacy(open_store(self.legacy))

    def expected(self) -> dict[str, tuple[bool, int]]:
        """image id -> (has_ptx, labels_version) after the relabel, from the CSVs."""
        moved = (self.positive, self.negative)
        return {i: (i in self.after, 2 if i in moved else 1) for i in self.ids}


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory) -> _Relabelled:
    root = tmp_path_factory.mktemp("relabelled")
    return _Relabelled(root, shared_data / "siim" / "sample_images")


LAYOUTS = ["delta", "legacy"]


def _image(row: dict) -> str:
    return row["image_id"]


def _store(data: _Relabelled, kind: str):
    return open_store(data.out if kind == "delta" else data.legacy)


def _wheres(data: _Relabelled) -> dict[str, set[str]]:
    """Filters and the images each must give, from the labels after the relabel."""
    e = data.expected()
    moved = {data.positive, data.negative}
    return {
        "has_ptx": data.after,
        "not has_ptx": data.ids - data.after,
        "labels_version == 2": moved,
        # Matched only by the two images' old labels (the legacy layout still has those rows).
        "labels_version == 1": data.ids - moved,
        "has_ptx and labels_version == 1": {i for i, (p, v) in e.items() if p and v == 1},
        f"image_id == '{data.positive}' and has_ptx": set(),
        f"image_id == '{data.negative}' and not has_ptx": set(),
        f"image_id in ['{data.positive}', '{data.negative}']": moved,
    }


@pytest.mark.parametrize("kind", LAYOUTS)
def test_an_unfiltered_read_has_each_image_once_with_its_latest_labels(data, kind):
    rows = manifest.read(_store(data, kind)).to_pylist()
    assert len(rows) == len(data.ids)
    assert {r["image_id"]: (r["has_ptx"], r["labels_version"]) for r in rows} == data.expected()
    delta = manifest.read(open_store(data.out)).to_pylist()
    assert rows == delta  # the legacy layout reads as the Delta table does


@pytest.mark.parametrize("kind", LAYOUTS)
def test_a_filter_gives_the_images_whose_latest_labels_match_and_only_those(data, kind):
    store = _store(data, kind)
    full = {r["image_id"]: r for r in manifest.read(store).to_pylist()}
    for where, wanted in _wheres(data).items():
        rows = manifest.read(store, where=where).to_pylist()
        ids = [r["image_id"] for r in rows]
        assert sorted(ids) == sorted(wanted), where  # each once: never the old row as well
        assert all(r == full[r["image_id"]] for r in rows), where


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize(
    "columns", [["image_id"], ["key", "image_id"], ["has_ptx", "image_id", "labels_version"]]
)
def test_a_column_subset_agrees_with_the_full_read(data, kind, columns):
    """The filter's columns need not be among those asked for."""
    store = _store(data, kind)
    for where, wanted in _wheres(data).items():
        full = manifest.read(store, where=where).to_pylist()
        part = manifest.read(store, where=where, columns=columns)
        assert part.column_names == columns, where
        # Sorted by key only when key is asked for: compare in image order.
        got = sorted(part.to_pylist(), key=_image)
        assert got == sorted(({c: r[c] for c in columns} for r in full), key=_image), where
        assert sorted(part.column("image_id").to_pylist()) == sorted(wanted), where


def test_the_version_before_the_relabel_gives_the_labels_it_had(data):
    store = open_store(data.out)
    earlier = data.version - 1
    for where, wanted in (("has_ptx", data.before), ("not has_ptx", data.ids - data.before)):
        rows = manifest.read(store, where=where, version=earlier).to_pylist()
        assert sorted(r["image_id"] for r in rows) == sorted(wanted), where
        assert {r["labels_version"] for r in rows} == {1} and {r["batch"] for r in rows} == {
            "first"
        }
        ids = manifest.read(store, where=where, columns=["image_id"], version=earlier)
        assert sorted(ids.column("image_id").to_pylist()) == sorted(wanted), where
    assert manifest.read(store, where="labels_version == 2", version=earlier).num_rows == 0
