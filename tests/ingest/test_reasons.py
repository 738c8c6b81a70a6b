"""Quarantine reason codes: the reasons ingest writes, each with the code a reader would
give it by hand (the texts are those of ingest/dicom.py, nih.py, labels.py, batch.py)."""

from __future__ import annotations

import pytest

from pneumo.ingest.reasons import CODES, reason_code

CASES = [
    ("file is empty", "empty-file"),
    ("not a DICOM file (no DICM prefix, no recognisable first element)", "not-dicom"),
    ("no transfer syntax, and the encoding cannot be told", "not-dicom"),
    ("truncated: End of file reached before delimiter", "truncated"),
    ("no pixel data (none in the file, or the file is cut off before it)", "no-pixels"),
    ("bad image size Rows=0 Columns=512", "no-pixels"),
    ("unsupported BitsAllocated 32", "no-pixels"),
    ("corrupt encapsulated pixel data (ValueError)", "undecodable"),
    ("cannot decode JPEG frame (OSError)", "undecodable"),
    (
        "cannot decode transfer syntax 1.2.840.10008.1.2.4.80 (JPEG-LS Lossless): no plugin",
        "undecodable",
    ),
    ("decoded (10, 10), header says 20x20", "undecodable"),
    ("not a PNG file", "bad-png"),
    ("truncated PNG (no IEND chunk)", "truncated"),
    ("cannot read PNG header (UnidentifiedImageError)", "bad-png"),
    ("file name has no NIH image index (NNNNNNNN_NNN)", "bad-name"),
    ("no row for 00000001_000.png in Data_Entry", "no-labels"),
    ("Data_Entry_2017.csv:12: expected at least 11 columns, found 3", "bad-label"),
    (
        "bad label (train.csv:7): RLE has an odd number of values (3): expected gap/length pairs",
        "bad-label",
    ),
    ("its sample key 1_2_3 is already used by image 1.2.3", "key-clash"),
    ("bad SEG: not a DICOM Segmentation (SOP Class 1.2.840.10008.5.1.4.1.1.7)", "bad-seg"),
    ("bad label (/segs/a.dcm): bad SEG: frame 512x512, image 1024x1024", "bad-seg"),
    ("SEG references no image of this batch or the dataset: 1.2.3", "seg-no-image"),
    ("something nobody foresaw", "other"),
]


@pytest.mark.parametrize(("reason", "code"), CASES)
def test_each_reason_gets_the_code_a_reader_would_give_it(reason, code):
    assert reason_code(reason) == code


def test_every_code_is_documented_and_used():
    assert {code for _, code in CASES} == set(CODES)
