"""``--where`` expressions become pyarrow filters, and nothing else."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pneumo.shards.errors import ManifestError
from pneumo.shards.manifest import SAMPLES_SCHEMA
from pneumo.shards.query import parse_where

ROWS = [
    {
        "key": "a",
        "split": "train",
        "has_ptx": True,
        "mask_area_px": 5000,
        "age_years": 30.0,
        "view_position": "PA",
        "findings": ["Pneumothorax", "Effusion"],
    },
    {
        "key": "b",
        "split": "train",
        "has_ptx": False,
        "mask_area_px": 0,
        "age_years": 70.0,
        "view_position": "AP",
        "findings": [],
    },
    {
        "key": "c",
        "split": "val",
        "has_ptx": None,
        "mask_area_px": None,
        "age_years": None,
        "view_position": "AP",
        "findings": ["Pneumothorax_like"],
    },
    {
        "key": "d",
        "split": "test",
        "has_ptx": True,
        "mask_area_px": 200,
        "age_years": 12.0,
        "view_position": "PA",
        "findings": ["Pneumothorax"],
    },
]
TABLE = pa.Table.from_pylist(ROWS, schema=SAMPLES_SCHEMA)


def keys(where: str) -> list[str]:
    return TABLE.filter(parse_where(where, SAMPLES_SCHEMA)).column("key").to_pylist()


@pytest.mark.parametrize(
    "where, expected",
    [
        ("has_ptx", ["a", "d"]),
        ("not has_ptx", ["b"]),
        ("has_ptx is None", ["c"]),
        ("has_ptx is not None and split == 'train'", ["a", "b"]),
        ("split in ['val', 'test']", ["c", "d"]),
        ("split not in ('train',)", ["c", "d"]),
        ("mask_area_px > 1000 or age_years < 18", ["a", "d"]),
        ("1000 < mask_area_px", ["a"]),
        ("18 <= age_years < 50", ["a"]),
        ("'Pneumothorax' in findings", ["a", "d"]),
        ("'Pneumothorax' not in findings", ["b", "c"]),
        ("view_position == 'AP' and (has_ptx or has_ptx is None)", ["c"]),
    ],
)
def test_expressions_select_the_right_rows(where, expected):
    assert keys(where) == expected


@pytest.mark.parametrize(
    "where, message",
    [
        ("nope == 1", "unknown column 'nope'"),
        ("split = 'x'", "not a valid expression"),
        ("__import__('os').system('true')", "unsupported syntax"),
        ("split == open('x')", "not a literal"),
        ("split", "not boolean"),
        ("has_ptx == None", "is None"),
        ("'x' in split", "not a list column"),
        ("split in 'train'", "list of values"),
    ],
)
def test_anything_else_is_refused_with_a_reason(where, message):
    with pytest.raises(ManifestError, match=message):
        parse_where(where, SAMPLES_SCHEMA)
