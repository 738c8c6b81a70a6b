"""What counts as changed labels: the same rows in another order, or an image given again
without a label file, are no change (a plain batch counts none, ``--relabel`` relabels
nothing); a different mask is one."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from pneumo.ingest.batch import BatchConfig, BatchSummary
from pneumo.ingest.nih import NihConfig, ingest_nih
from pneumo.ingest.siim import SiimConfig, ingest_siim
from pneumo.shards import manifest
from pneumo.shards.store import open_store


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    """(image id, RLE) per line of the header-less sample CSV, read as plain text."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return [(i.strip(), rle.strip()) for i, rle in (line.split(",", 1) for line in lines if line)]


def _pixels(rle: str) -> set[int]:
    """The flat pixel indices of one SIIM RLE (each gap counted from the previous run's end)."""
    values = [int(v) for v in rle.split()]
    out, at = set(), 0
    for gap, length in zip(values[::2], values[1::2], strict=True):
        at += gap
        out.update(range(at, at + length))
        at += length
    return out


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{i},{rle}\n" for i, rle in rows))
    return path


def _by_id(out: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in manifest.read(open_store(out)).to_pylist()}


class _Siim:
    """The SIIM sample ingested once, with one positive image (``two``) given two instance
    rows: its own RLE, then another positive image's."""

    def __init__(self, root: Path, sample: Path) -> None:
        self.sample = sample
        rows = _csv_rows(sample / "train-rle-sample.csv")
        positives = sorted(i for i, rle in rows if rle != "-1")
        self.two, donor = positives[0], positives[1]
        rle = dict(rows)
        self.own, self.extra = rle[self.two], rle[donor]
        self.rows = rows + [(self.two, self.extra)]
        self.labels = _write(root / "two_instances.csv", self.rows)
        self.out = root / "ds"
        ingest_siim(self.config(self.out, self.labels, batch="first"))
        self.before = _by_id(self.out)

    def config(
        self, out: Path, labels: Path | None, *, batch: str, relabel: bool = False
    ) -> SiimConfig:
        return SiimConfig(
            dicom_root=str(self.sample),
            labels=labels,
            batch=BatchConfig(out=str(out), batch=batch, relabel=relabel),
        )

    def copy(self, tmp_path: Path) -> Path:
        out = tmp_path / "ds"
        shutil.copytree(self.out, out)
        return out


@pytest.fixture(scope="module")
def siim(shared_data, tmp_path_factory) -> _Siim:
    return _Siim(tmp_path_factory.mktemp("siim"), shared_data / "siim" / "sample_images")


def _counts(s: BatchSummary) -> tuple[int, int, int, int, int]:
    return s.ingested, s.skipped, s.relabelled, s.label_changes, s.quarantined


def test_the_sample_is_stored_with_both_instances_of_the_two_row_image(siim):
    before = siim.before
    assert len(before) == 10 and {r["labels_version"] for r in before.values()} == {1}
    positives = {i for i, rle in siim.rows if rle != "-1"}
    assert {i for i, r in before.items() if r["has_ptx"]} == positives
    union = _pixels(siim.own) | _pixels(siim.extra)
    assert before[siim.two]["mask_area_px"] == len(union) > len(_pixels(siim.own))


def test_the_same_label_rows_in_another_order_are_no_change(siim, tmp_path):
    out = siim.copy(tmp_path)
    shuffled = list(reversed(siim.rows))  # also swaps the two rows of the two-row image
    assert [r for i, r in shuffled if i == siim.two] == [siim.extra, siim.own]
    labels = _write(tmp_path / "reordered.csv", shuffled)

    plain = ingest_siim(siim.config(out, labels, batch="plain"))
    assert _counts(plain) == (0, 10, 0, 0, 0)
    relabel = ingest_siim(siim.config(out, labels, batch="relabel", relabel=True))
    assert _counts(relabel) == (0, 10, 0, 0, 0)
    assert _by_id(out) == siim.before  # same rows: labels version 1, the first batch's shards


def test_an_image_given_again_without_labels_is_no_change(siim, tmp_path):
    out = siim.copy(tmp_path)
    plain = ingest_siim(siim.config(out, None, batch="plain"))
    assert _counts(plain) == (0, 10, 0, 0, 0)
    relabel = ingest_siim(siim.config(out, None, batch="relabel", relabel=True))
    assert _counts(relabel) == (0, 10, 0, 0, 0)
    assert _by_id(out) == siim.before  # the stored labels are kept, not wiped


def test_a_different_mask_is_a_change_even_when_the_image_stays_positive(siim, tmp_path):
    out = siim.copy(tmp_path)
    one = [(i, rle) for i, rle in siim.rows if (i, rle) != (siim.two, siim.extra)]
    labels = _write(tmp_path / "one_instance.csv", one)

    plain = ingest_siim(siim.config(out, labels, batch="plain"))
    assert _counts(plain) == (0, 10, 0, 1, 0)
    assert _by_id(out) == siim.before  # counted, not stored, without --relabel
    relabel = ingest_siim(siim.config(out, labels, batch="relabel", relabel=True))
    assert _counts(relabel) == (1, 9, 1, 0, 0)
    after = _by_id(out)
    assert after[siim.two]["has_ptx"] is True and after[siim.two]["labels_version"] == 2
    assert after[siim.two]["mask_area_px"] == len(_pixels(siim.own))
    assert after[siim.two]["labels_sha256"] != siim.before[siim.two]["labels_sha256"]
    assert {i: r for i, r in after.items() if i != siim.two} == {
        i: r for i, r in siim.before.items() if i != siim.two
    }


# --- NIH: the findings of a row, in any order ----------------------------------------------


def _data_entry(path: Path, source: Path, findings: dict[str, str], reverse: bool) -> Path:
    """A Data_Entry file of the real header and the real rows of ``findings``' images,
    with their Finding Labels replaced."""
    header, *lines = gzip.decompress(source.read_bytes()).decode().splitlines()
    rows = [line.split(",") for line in lines if line.split(",", 1)[0] in findings]
    assert len(rows) == len(findings)
    for row in rows:
        row[1] = findings[row[0]]
    rows = rows[::-1] if reverse else rows
    path.write_text("\r\n".join([header] + [",".join(r) for r in rows]) + "\r\n")
    return path


def test_nih_findings_in_another_order_are_no_change_and_other_findings_are(shared_data, tmp_path):
    nih = shared_data / "nih"
    names = sorted(p.name for p in (nih / "images").glob("*.png"))
    assert len(names) == 3
    first, others = names[0], names[1:]
    base = dict.fromkeys(others, "No Finding")
    source = nih / "Data_Entry_2017.csv.gz"
    out = tmp_path / "ds"

    def batch(findings: dict[str, str], name: str, relabel: bool, reverse: bool = False):
        labels = _data_entry(tmp_path / f"{name}.csv", source, findings, reverse)
        cfg = BatchConfig(out=str(out), batch=name, relabel=relabel)
        return _counts(
            ingest_nih(NihConfig(image_root=str(nih / "images"), labels=labels, batch=cfg))
        )

    assert batch({first: "Cardiomegaly|Emphysema", **base}, "first", False) == (3, 0, 0, 0, 0)
    before = _by_id(out)
    swapped = {first: "Emphysema|Cardiomegaly", **base}
    assert batch(swapped, "plain", False, reverse=True) == (0, 3, 0, 0, 0)
    assert batch(swapped, "relabel", True, reverse=True) == (0, 3, 0, 0, 0)
    assert _by_id(out) == before

    fewer = {first: "Emphysema", **base}
    assert batch(fewer, "fewer", False) == (0, 3, 0, 1, 0)
    assert batch(fewer, "fewer-relabel", True) == (1, 2, 1, 0, 0)
    after = _by_id(out)
    assert after[first]["findings"] == ["Emphysema"] and after[first]["labels_version"] == 2
    assert all(after[n] == before[n] for n in others)
