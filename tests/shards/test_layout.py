"""Sample keys: short, safe, dot-free, stable; readable for the ids real data has."""

from __future__ import annotations

import re

import pytest

from pneumo.shards import layout

SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@pytest.mark.parametrize(
    "image_id, key",
    [
        ("1.2.276.0.7230010.3.1.4.8323329.4904.1517875185.355709", None),
        ("ID_0011fe81e", "ID_0011fe81e"),
        ("00000001_000", "00000001_000"),
    ],
)
def test_real_ids_keep_readable_keys(image_id, key):
    want = key or image_id.replace(".", "_")
    assert layout.sample_key(image_id) == want


@pytest.mark.parametrize(
    "image_id",
    [
        "1.2." + "9" * 112,
        "../../escape",
        "with space",
        "unicodé-ид",
        "x" * 65,
        "",
        ".hidden",
        "a/b",
        "1.2_3",  # dots and underscores mixed: replacing dots would not be reversible
    ],
)
def test_other_ids_get_a_hashed_key(image_id):
    key = layout.sample_key(image_id)
    assert SAFE.fullmatch(key) and key.startswith("h_") and len(key) == 34
    assert layout.sample_key(image_id) == key  # stable


def test_distinct_ids_get_distinct_keys():
    ids = ["1.2.3", "1.2.3.", "x" * 65, "x" * 66, "a b", "a  b", "1.2_3", "1_2.3"]
    assert len({layout.sample_key(i) for i in ids}) == len(ids)
