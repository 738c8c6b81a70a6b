"""Label readers on the real SIIM and NIH files, and on variants written from them."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import sample_data

from pneumo.ingest.dicom import BadInput
from pneumo.ingest.labels import (
    read_nih_bboxes,
    read_nih_entries,
    read_nih_xref,
    read_siim_labels,
    read_split_list,
)

# The full sample set, or the part of it in tests/data (tests/sample_data.py).
DATA = sample_data.root()
SIIM = DATA / "siim"
NIH = DATA / "nih"
TRAIN_RLE = SIIM / "siim-pneumothorax-train-rle.csv.gz"
SAMPLE_RLE = SIIM / "sample_images" / "train-rle-sample.csv"
FIRST_SAMPLE_ID = "1.2.276.0.7230010.3.1.4.8323329.1000.1517875165.878027"
# The only image with 10 instances.
TEN_INSTANCES = 10


@pytest.fixture(scope="module")
def train_labels():
    return read_siim_labels(TRAIN_RLE)


def test_stage2_file_counts(train_labels) -> None:
    labels, problems = train_labels
    assert problems == []
    assert len(labels) == 12_047
    assert sum(len(label.rows) for label in labels.values()) == 12_954
    assert sum(label.has_ptx for label in labels.values()) == 2_669
    assert max(len(label.rles) for label in labels.values()) == TEN_INSTANCES
    # Every data line 2..12955 belongs to exactly one image.
    lines = sorted(line for label in labels.values() for line in label.rows)
    assert lines == list(range(2, 12_956))


def test_stage2_file_keeps_rows_in_file_order(train_labels) -> None:
    labels, _ = train_labels
    text = gzip.decompress(TRAIN_RLE.read_bytes()).decode().splitlines()
    label = next(label for label in labels.values() if len(label.rles) == TEN_INSTANCES)
    assert [text[line - 1].split(",", 1)[1].strip() for line in label.rows] == list(label.rles)
    assert all(rle == rle.strip() and rle != "-1" for rle in label.rles)


def test_headerless_sample_with_bom_and_no_final_newline(train_labels) -> None:
    raw = SAMPLE_RLE.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and not raw.endswith(b"\n")  # the real quirks
    labels, problems = read_siim_labels(SAMPLE_RLE)
    assert problems == []
    assert len(labels) == 10
    assert sum(label.has_ptx for label in labels.values()) == 5
    first = labels[FIRST_SAMPLE_ID]  # the BOM is not part of the id
    assert first.rows == (1,) and not first.has_ptx
    # Same RLE strings as the stage-2 file for the same images.
    stage2, _ = train_labels
    for image_id, label in labels.items():
        assert label.rles == stage2[image_id].rles


def test_stage1_style_spaces_crlf_and_gzip_by_magic(tmp_path: Path, train_labels) -> None:
    lines = gzip.decompress(TRAIN_RLE.read_bytes()).decode().splitlines()[1:]
    stage1 = "ImageId, EncodedPixels\r\n" + "".join(
        f"{image_id}, {rle}\r\n" for image_id, rle in (line.split(",") for line in lines)
    )
    assert stage1.count(", -1\r\n") == 9_378
    plain = tmp_path / "train-rle.csv"
    plain.write_text(stage1, newline="")
    disguised = tmp_path / "train-rle-gz.csv"  # gzip content, no .gz in the name
    disguised.write_bytes(gzip.compress(stage1.encode()))
    expected, _ = train_labels
    for path in (plain, disguised):
        labels, problems = read_siim_labels(path)
        assert problems == []
        assert labels == expected


def test_bad_rows_are_named_and_their_image_left_out(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(
        "ImageId,EncodedPixels\n"
        "good,1 2\n"  # line 2
        "bad_rle,3 4\n"  # line 3: fine on its own ...
        "bad_rle,3 4 5\n"  # line 4: ... but this instance is malformed
        ",1 2\n"  # line 5: no image id
        "three_cols,1 2,3 4\n"  # line 6
        "garbage,1 x\n"  # line 7
        "zero_run,5 0\n"  # line 8
        "mixed, -1\n"  # line 9
        "mixed, 7 1\n"  # line 10
        "\n"
        "negative,-1\n"  # line 12
    )
    labels, problems = read_siim_labels(path)
    assert sorted(labels) == ["good", "mixed", "negative"]
    assert labels["good"].rles == ("1 2",) and labels["good"].rows == (2,)
    assert labels["mixed"].rles == ("7 1",) and labels["mixed"].rows == (9, 10)
    assert labels["negative"].rles == () and labels["negative"].rows == (12,)
    found = {(p.source, p.image_id): p.reason for p in problems}
    assert set(found) == {
        ("labels.csv:4", "bad_rle"),
        ("labels.csv:5", None),
        ("labels.csv:6", "three_cols"),
        ("labels.csv:7", "garbage"),
        ("labels.csv:8", "zero_run"),
    }
    assert "odd number" in found["labels.csv:4", "bad_rle"]
    assert "ImageId" in found["labels.csv:5", None]
    assert "2 columns" in found["labels.csv:6", "three_cols"]
    assert "integers" in found["labels.csv:7", "garbage"]
    assert "length 0" in found["labels.csv:8", "zero_run"]


def test_unreadable_or_foreign_label_files(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="cannot read"):
        read_siim_labels(tmp_path / "missing.csv")
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("ImageId,Label\nx,1\n")
    with pytest.raises(BadInput, match="EncodedPixels"):
        read_siim_labels(foreign)
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(TRAIN_RLE.read_bytes()[:5000])
    with pytest.raises(BadInput, match="cut off"):
        read_siim_labels(cut)


@pytest.fixture(scope="module")
def nih_2017():
    return read_nih_entries(NIH / "Data_Entry_2017.csv.gz")


@pytest.fixture(scope="module")
def nih_2020():
    return read_nih_entries(NIH / "Data_Entry_2017_v2020.csv.gz")


def test_nih_2017_entries(nih_2017) -> None:
    entries, problems = nih_2017
    assert problems == []
    assert len(entries) == 112_120
    assert sum(entry.has_ptx for entry in entries.values()) == 5_298
    assert len({entry.patient_id for entry in entries.values()}) == 30_805
    first = entries["00000001_000.png"]
    assert first.findings == ("Cardiomegaly",) and first.patient_id == "00000001"
    assert (first.follow_up, first.age_years, first.sex, first.view_position) == (0, 58, "M", "PA")
    assert entries["00000001_001.png"].findings == ("Cardiomegaly", "Emphysema")
    no_finding = [e for e in entries.values() if not e.findings]
    assert len(no_finding) > 50_000 and not any(e.has_ptx for e in no_finding)


def test_nih_2017_ages_with_units_and_errors(nih_2017) -> None:
    entries, _ = nih_2017
    ages = [entry.age_years for entry in entries.values()]
    assert ages.count(None) == 16  # 148..414 years: data errors, dropped
    assert 1 / 365 in ages  # "001D"
    assert 11 / 12 in ages  # "011M"
    assert sum(age is not None and age < 2 and age != 1 for age in ages) > 20
    assert max(age for age in ages if age is not None) <= 120


def test_nih_v2020_entries(nih_2017, nih_2020) -> None:
    entries, problems = nih_2020
    assert problems == []
    assert len(entries) == 112_120
    assert sum(entry.has_ptx for entry in entries.values()) == 5_302
    assert set(entries) == set(nih_2017[0])
    # v2020 writes "1" for patient 00000001 and bare integer ages; the same image is 57 here
    # and 58 in 2017 (27k ages changed between the releases).
    first = entries["00000001_000.png"]
    assert (first.patient_id, first.age_years) == ("00000001", 57)
    assert all(re.fullmatch(r"\d{8}", e.patient_id) for e in entries.values())
    assert max(e.age_years or 0 for e in entries.values()) == 95


def test_nih_plain_csv_and_bad_rows(tmp_path: Path, nih_2017) -> None:
    text = gzip.decompress((NIH / "Data_Entry_2017.csv.gz").read_bytes()).decode()
    lines = text.split("\r\n")
    assert lines[0].endswith(",")  # the trailing comma of the real header
    bad = [
        "00000001_000.png,Cardiomegaly,000,00000002,058Y,M,PA,2682,2749,0.143,0.143,",
        "00000003_000.png,Hernia,000",
        "00000004_000.png,Mass,000,x,082Y,M,AP,2500,2048,0.168,0.168,",
    ]
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text("\r\n".join(lines[:30] + bad) + "\r\n", newline="")
    entries, problems = read_nih_entries(path)
    assert {p.source: p.image_id for p in problems} == {
        "Data_Entry_2017.csv:31": "00000001_000.png",
        "Data_Entry_2017.csv:32": "00000003_000.png",
        "Data_Entry_2017.csv:33": "00000004_000.png",
    }
    assert "prefix" in problems[0].reason and "columns" in problems[1].reason
    # Images with a bad row are left out, even where their good row came first; the
    # other rows give the same entries as the real file.
    bad_names = {"00000001_000.png", "00000003_000.png", "00000004_000.png"}
    real_names = {line.split(",")[0] for line in lines[1:30]}
    assert bad_names <= real_names  # each bad image also has its real, good row
    assert set(entries) == real_names - bad_names
    for name, entry in entries.items():
        assert entry == nih_2017[0][name]


def test_nih_header_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("Image,Labels,Follow,Patient,Age,Sex,View\n")
    with pytest.raises(BadInput, match="Image Index"):
        read_nih_entries(path)


def test_bboxes() -> None:
    boxes = read_nih_bboxes(NIH / "BBox_List_2017.csv")
    all_boxes = [box for found in boxes.values() for box in found]
    assert len(all_boxes) == 984
    labels = {box.label for box in all_boxes}
    assert len(labels) == 8 and "Infiltrate" in labels and "Infiltration" not in labels
    assert sum(box.label == "Pneumothorax" for box in all_boxes) == 98
    first = boxes["00013118_008.png"][0]
    assert first.label == "Atelectasis"
    assert (first.x, first.y, first.w, first.h) == pytest.approx(
        (225.08, 547.02, 86.78, 79.19), abs=0.01
    )
    # All boxed images are in the official test split.
    assert set(boxes) <= read_split_list(NIH / "test_list.txt")


def test_bbox_bad_row_is_named(tmp_path: Path) -> None:
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Mass,1,2,3\n")
    with pytest.raises(BadInput, match="BBox_List_2017.csv:2"):
        read_nih_bboxes(path)


def test_split_lists(tmp_path: Path, nih_2020) -> None:
    train_val = read_split_list(NIH / "train_val_list.txt")
    test = read_split_list(NIH / "test_list.txt")
    assert (len(train_val), len(test)) == (86_524, 25_596)
    assert not train_val & test
    assert train_val | test == set(nih_2020[0])
    messy = tmp_path / "list.txt"
    messy.write_text(" a.png \r\n\r\nb.png")
    assert read_split_list(messy) == {"a.png", "b.png"}


def test_siim_to_nih_xref(train_labels) -> None:
    xref = read_nih_xref(SIIM / "siim_to_nih_id.csv")
    assert len(xref) == 12_047
    assert set(xref) == set(train_labels[0])
    assert all(re.fullmatch(r"\d{8}", patient) for patient in xref.values())
    assert xref["1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090"] == "00028864"
    assert len(set(xref.values())) == 6_171
