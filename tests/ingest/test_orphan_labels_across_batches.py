"""A label file that covers a whole archive, given with each part of it: the rows of images
that a later batch brings are counted as orphans (not quarantined), and no longer once those
images are stored."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from pneumo.ingest.batch import BatchConfig, BatchSummary
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import manifest
from pneumo.shards.store import open_store


def _labels(text: str) -> dict[str, bool]:
    """image id -> positive, from the CSV text: positive iff a row has an RLE other than -1."""
    positive: dict[str, bool] = {}
    for line in text.lstrip("\ufeff").splitlines():
        if not line.strip():
            continue
        image_id, rle = (cell.strip() for cell in line.split(",", 1))
        positive[image_id] = positive.get(image_id, False) or rle not in ("-1", "")
    return positive


def _split(sample: Path, root: Path) -> tuple[Path, Path]:
    """The sample's DICOMs in two folders: every other file, so both hold both labels."""
    dicoms = sorted(sample.glob("*.dcm"))
    first, second = root / "part1", root / "part2"
    for folder, files in ((first, dicoms[::2]), (second, dicoms[1::2])):
        folder.mkdir()
        for f in files:
            shutil.copy(f, folder / f.name)
    return first, second


def _ingest(folder: Path, labels: Path, out: Path, batch: str) -> BatchSummary:
    cfg = BatchConfig(out=str(out), batch=batch)
    return ingest_siim(SiimConfig(dicom_root=str(folder), labels=labels, batch=cfg))


@pytest.fixture
def sample(shared_data) -> Path:
    return shared_data / "siim" / "sample_images"


def test_rows_of_images_a_later_batch_brings_are_orphans_only_until_then(sample, tmp_path):
    labels = sample / "train-rle-sample.csv"
    positive = _labels(labels.read_text(encoding="utf-8"))
    first, second = _split(sample, tmp_path)
    in_first = {f.stem for f in first.glob("*.dcm")}
    in_second = {f.stem for f in second.glob("*.dcm")}
    assert in_first and in_second and set(positive) == in_first | in_second
    assert {positive[i] for i in in_first} == {positive[i] for i in in_second} == {True, False}
    out = tmp_path / "ds"

    one = _ingest(first, labels, out, "one")
    assert (one.ingested, one.quarantined) == (len(in_first), 0)
    assert one.orphan_labels == len(set(positive) & in_second)
    two = _ingest(second, labels, out, "two")
    assert (two.ingested, two.skipped, two.quarantined) == (len(in_second), 0, 0)
    assert two.orphan_labels == 0  # the rows of part 1's images: stored by batch one

    rows = manifest.read(open_store(out)).to_pylist()
    assert {r["image_id"]: r["has_ptx"] for r in rows} == positive
    assert {r["image_id"]: r["batch"] for r in rows} == {
        **dict.fromkeys(in_first, "one"),
        **dict.fromkeys(in_second, "two"),
    }
    assert manifest.read(open_store(out), table="quarantine").num_rows == 0


def test_a_row_whose_image_no_batch_brings_stays_an_orphan(shared_data, sample, tmp_path):
    """A real row of the full label file whose image is not in the sample: counted by every
    batch, never stored, never quarantined."""
    text = (sample / "train-rle-sample.csv").read_text(encoding="utf-8")
    full = gzip.decompress(
        (shared_data / "siim" / "siim-pneumothorax-train-rle.csv.gz").read_bytes()
    )
    known = _labels(text)
    extra = next(
        line
        for line in full.decode().splitlines()[1:]
        if line.split(",", 1)[0].strip() not in known and line.split(",", 1)[1].strip() != "-1"
    )
    labels = tmp_path / "labels.csv"
    labels.write_text(text.lstrip("\ufeff").rstrip("\n") + "\n" + extra + "\n")
    positive = _labels(labels.read_text())
    assert len(positive) == len(known) + 1
    first, second = _split(sample, tmp_path)
    in_second = {f.stem for f in second.glob("*.dcm")}
    out = tmp_path / "ds"

    one = _ingest(first, labels, out, "one")
    assert (one.orphan_labels, one.quarantined) == (len(in_second) + 1, 0)
    two = _ingest(second, labels, out, "two")
    assert (two.orphan_labels, two.quarantined) == (1, 0)
    rows = manifest.read(open_store(out)).to_pylist()
    assert {r["image_id"]: r["has_ptx"] for r in rows} == {
        i: p for i, p in positive.items() if i in known
    }
