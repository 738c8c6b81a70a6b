"""The experiment joins each scored image to its patient through the dataset's manifest
(the per-image results hold the sample key; the manifest the keyed patient hash)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pytest

from pneumo.experiment import run
from pneumo.shards.errors import ConfigError

# image id -> the manifest's patient key; two images of one patient, one without a key
MANIFEST = {"1.2.1": "hash-a", "1.2.2": "hash-a", "1.2.3": "hash-b", "1.2.4": None}


@pytest.fixture
def dataset(tmp_path: Path, write_shards: Any) -> str:
    png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    rows = [
        {"key": f"k{n}", "image_id": image, "dataset": "siim", "split": "test",
         "has_ptx": False, "rows": 8, "cols": 8, "image_format": "png", "bit_depth": 8,
         "patient_key": patient, "patient_basis": "nih-xref"}
        for n, (image, patient) in enumerate(MANIFEST.items(), start=1)
    ]  # fmt: skip
    write_shards(tmp_path / "data", rows, lambda row: {"png": png}, per_shard=4, one_shard=True)
    return str(tmp_path / "data")


def _scored(keys: list[str], images: list[str]) -> pa.Table:
    return pa.table({"image_id": images, "key": keys, "dice": [0.5] * len(keys)})


def test_scored_images_get_the_manifests_patient_key_by_sample_key(dataset: str) -> None:
    # two evaluations of the same images; the image ids in the results are not looked up
    # (a join on them would find nothing for "scored-3")
    one = _scored(["k3", "k1"], ["scored-3", "scored-1"])
    two = _scored(["k2", "k1"], ["scored-2", "scored-1"])
    assert run._patients_of(dataset, [one, two]) == {
        "scored-3": "hash-b",
        "scored-1": "hash-a",
        "scored-2": "hash-a",
    }


@pytest.mark.parametrize("key", ["k4", "k9"])  # no patient_key; not in the manifest at all
def test_an_image_without_a_patient_is_one_clear_error(dataset: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        run._patients_of(dataset, [_scored(["k1", key], ["a", "b"])])
    assert str(e.value) == (
        f"{dataset}: scored image {key} has no patient_key in the manifest; "
        "the intervals resample patients"
    )
