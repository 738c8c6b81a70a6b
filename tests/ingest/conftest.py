"""SIIM and NIH files of the same patients, from the real sample data.

The SIIM sample DICOMs are ChestX-ray14 images: ``siim_to_nih_id.csv`` names their NIH
images, hence their NIH patients. For each of those patients the NIH side holds the
xref'd image and one more of the patient's images (real ``Data_Entry_2017.csv.gz`` rows),
with real NIH pixels: the sample PNGs, each turned by 0/90/180/270 degrees so that every
file has its own bytes (the same bytes twice would be stored once).
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumo.ingest.labels import read_nih_entries


@dataclass(frozen=True)
class Linked:
    siim_dir: Path  # the 11 labelled SIIM DICOMs (sample_images + dicom_train)
    siim_labels: Path  # the real stage-2 train RLE CSV
    xref: Path  # the real siim_to_nih_id.csv
    nih_dir: Path  # NIH PNGs of the same patients
    data_entry: Path  # the real Data_Entry_2017.csv.gz
    train_val: Path
    test_list: Path
    siim_patient: dict[str, str]  # SIIM ImageId -> NIH patient id (from the xref)
    nih_images: list[str]  # NIH image names written


@pytest.fixture(scope="session")
def linked(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Linked:
    root = tmp_path_factory.mktemp("linked")
    siim = shared_data / "siim"
    siim_dir = root / "siim" / "study" / "series"
    siim_dir.mkdir(parents=True)
    for dcm in sorted(siim.glob("sample_images/*.dcm")) + sorted(siim.glob("dicom_train/*.dcm")):
        shutil.copy(dcm, siim_dir / dcm.name)
    with open(siim / "siim_to_nih_id.csv", newline="") as f:
        xref = {row["Kaggle_ID"]: row["NIH_ID"] for row in csv.DictReader(f)}
    ids = [p.stem for p in sorted(siim_dir.glob("*.dcm"))]
    patients = {image_id: xref[image_id][:8] for image_id in ids}
    assert len(patients) == 11, "every sample DICOM has an NIH image in the xref"
    entries, _ = read_nih_entries(shared_data / "nih" / "Data_Entry_2017.csv.gz")
    by_patient: dict[str, list[str]] = {}
    for name in sorted(entries):
        by_patient.setdefault(name[:8], []).append(name)
    names: list[str] = []
    for image_id in ids:
        mine = xref[image_id]
        others = [n for n in by_patient[mine[:8]] if n != mine]
        names += [mine] + others[:1]
    names = sorted(set(names))
    nih_dir = root / "nih" / "images"
    nih_dir.mkdir(parents=True)
    pixels = _real_nih_pixels(shared_data / "nih")
    for i, name in enumerate(names):
        image = np.rot90(pixels[i % len(pixels)], k=i // len(pixels))
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
        assert ok
        (nih_dir / name).write_bytes(buf.tobytes())
    nih = shared_data / "nih"
    return Linked(
        siim_dir=root / "siim",
        siim_labels=siim / "siim-pneumothorax-train-rle.csv.gz",
        xref=siim / "siim_to_nih_id.csv",
        nih_dir=root / "nih",
        data_entry=nih / "Data_Entry_2017.csv.gz",
        train_val=nih / "train_val_list.txt",
        test_list=nih / "test_list.txt",
        siim_patient=patients,
        nih_images=names,
    )


def _real_nih_pixels(nih: Path) -> list[np.ndarray]:
    paths = sorted(nih.glob("images/*.png")) + sorted(nih.glob("images_downscaled/*.png"))
    return [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]
