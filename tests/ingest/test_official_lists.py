"""Official split lists with --split-fractions, end to end through ``pneumo ingest``.

With NIH's ``train_val_list.txt`` / ``test_list.txt`` the lists decide the whole test split:
exactly the patients with an image listed for test are test, whatever test share the
fractions name; the other patients are shared between train and val in the ratio of the
train and val fractions. The fractions here give test a large share (0.4), so a command
that lost the "official" flag would put about 40% of the unlisted patients in test too.

The data are the synthetic NIH + SIIM pair (``pneumo.synthetic.archives``, 64 px), with
the lists rewritten so that a listed patient with several images has only one of them in
``test_list.txt`` (the others in ``train_val_list.txt``): the rule is per patient.
Expected splits are computed here from the list files, ``Data_Entry_2017.csv`` and the
xref, read with the csv module, never through pneumo's readers.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from pneumo.shards import manifest
from pneumo.shards.store import open_store
from pneumo.synthetic.archives import write_demo_pair

FRACTIONS = (0.4, 0.2, 0.4)
VAL_SHARE = FRACTIONS[1] / (FRACTIONS[0] + FRACTIONS[1])  # 1/3 of the unlisted patients
SECRET = "test-secret-0123456789abcdef-official-lists"


@dataclass(frozen=True)
class Data:
    root: Path
    nih_root: Path
    data_entry: Path
    siim_root: Path
    siim_labels: Path
    xref: Path
    train_val: Path
    test_list: Path
    key_file: Path
    patient_of_nih: dict[str, str]  # NIH image name -> Patient ID (from Data_Entry)
    patient_of_siim: dict[str, str]  # SIIM ImageId -> NIH Patient ID (xref, then Data_Entry)
    test_patients: frozenset[str]  # patients with at least one image in test_list.txt


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("official")
    pair = write_demo_pair(root / "raw", n_nih=600, n_siim=200, size=64, seed=3)
    with open(pair.nih.labels_csv, newline="") as f:
        rows = list(csv.reader(f))[1:]
    patient_of_nih = {r[0]: r[3] for r in rows if r}
    images_of: dict[str, list[str]] = {}
    for name, patient in sorted(patient_of_nih.items()):
        images_of.setdefault(patient, []).append(name)
    # The demo's lists are patient-disjoint; list only the last image of each listed patient
    # for test (its others go to train_val), and take the listed patients from there.
    listed = (pair.nih.out_dir / "test_list.txt").read_text().split()
    test_patients = frozenset(patient_of_nih[n] for n in listed)
    test_names = {images_of[p][-1] for p in test_patients}
    multi = [p for p in test_patients if len(images_of[p]) > 1]
    assert len(multi) >= 10, "some listed patients have several images"
    lists = root / "lists"
    lists.mkdir()
    (lists / "test_list.txt").write_text("\n".join(sorted(test_names)) + "\n")
    (lists / "train_val_list.txt").write_text(
        "\n".join(sorted(set(patient_of_nih) - test_names)) + "\n"
    )
    with open(pair.xref, newline="") as f:
        patient_of_siim = {r["Kaggle_ID"]: patient_of_nih[r["NIH_ID"]] for r in csv.DictReader(f)}
    key_file = root / "patient-key"
    key_file.write_text(SECRET + "\n")
    return Data(
        root=root,
        nih_root=pair.nih.image_root,
        data_entry=pair.nih.labels_csv,
        siim_root=pair.siim.image_root,
        siim_labels=pair.siim.labels_csv,
        xref=pair.xref,
        train_val=lists / "train_val_list.txt",
        test_list=lists / "test_list.txt",
        key_file=key_file,
        patient_of_nih=patient_of_nih,
        patient_of_siim=patient_of_siim,
        test_patients=test_patients,
    )


def _common(data: Data, out: Path) -> list[str]:
    return [
        "--out", str(out),
        "--split-lists", str(data.train_val), str(data.test_list),
        "--split-fractions", ",".join(str(f) for f in FRACTIONS),
        "--patient-key-file", str(data.key_file),
    ]  # fmt: skip


def _check_splits(out: Path, patient_of: dict[str, str], test_patients: frozenset[str]) -> None:
    """Every image's patient is known; test is exactly the listed patients; one split per
    patient; the unlisted patients are train/val in the ratio the fractions give."""
    store = open_store(str(out))
    rows = manifest.read(store).to_pylist()
    assert len(rows) == len(patient_of), "every image was ingested"
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(patient_of[r["image_id"]], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values()), {
        p: s for p, s in split_of.items() if len(s) > 1
    }
    split = {p: next(iter(s)) for p, s in split_of.items()}
    want_test = test_patients & split.keys()
    assert len(want_test) >= 10
    assert {p for p, s in split.items() if s == "test"} == want_test
    others = [s for p, s in split.items() if p not in want_test]
    n = len(others)
    assert set(others) <= {"train", "val"}
    share = others.count("val") / n
    sd = math.sqrt(VAL_SHARE * (1 - VAL_SHARE) / n)
    # 4 sd either side: about 1 in 16,000 to fail by chance (the split is a fixed hash, so
    # this data passes or fails the same way every run). The default fractions' val share
    # (0.1 / 0.9) lies outside.
    assert abs(share - VAL_SHARE) < 4 * sd, (share, n)
    policy = manifest.read_settings(store)["split_policy"]
    assert policy["test_from_lists"] is True
    assert policy["fractions"] == pytest.approx(list(FRACTIONS))


def test_nih_official_lists_fix_test_and_fractions_share_the_rest(data, pneumo, tmp_path):
    out = tmp_path / "ds"
    pneumo("ingest", "nih", str(data.nih_root), "--labels", str(data.data_entry),
           *_common(data, out))  # fmt: skip
    assert len(data.patient_of_nih) == 600
    _check_splits(out, data.patient_of_nih, data.test_patients)


def test_siim_official_lists_fix_test_through_the_xref(data, pneumo, tmp_path):
    out = tmp_path / "ds"
    pneumo("ingest", "siim", str(data.siim_root), "--labels", str(data.siim_labels),
           "--nih-xref", str(data.xref), *_common(data, out))  # fmt: skip
    rows = manifest.read(open_store(str(out))).to_pylist()
    assert {r["patient_basis"] for r in rows} == {"nih-xref"}
    # The SIIM set holds only some NIH patients: enough listed ones to matter.
    assert len(data.test_patients & set(data.patient_of_siim.values())) >= 10
    _check_splits(out, data.patient_of_siim, data.test_patients)
