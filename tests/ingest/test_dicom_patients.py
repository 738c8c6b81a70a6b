"""Patients from the DICOM header: a hospital's batches split by patient, never storing the id.

The hospital files are copies of the real SIIM DICOMs with their PatientID (and PatientName,
which SIIM sets to the same value) rewritten: several images per patient, some patients in
two batches. Each copy keeps the real pixels; identical pixels would be stored once, so
after a source's first (JPEG, as it is) copy, its copies are uncompressed with a few pixel
bits flipped. The real SIIM files show the other side: their PatientIDs are per-image
pseudonyms (image-level in effect) unless the xref names their NIH patients, and the
stage-2 test files have an empty PatientID (each image its own patient).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.uid import generate_uid

from pneumo.ingest.dicom import read_dicom
from pneumo.ingest.dicom_lean import read_lean
from pneumo.ingest.patients import DicomPatientRule
from pneumo.shards import manifest
from pneumo.shards.errors import ConfigError
from pneumo.shards.store import open_store

SECRET = "dicom-patients-test-secret-0123456789"
N_PATIENTS, PER_PATIENT = 8, 3


def _key(text: str) -> str:
    """The documented recipe: HMAC-SHA256(secret, "namespace:id"), 20 hex characters."""
    return hmac.new(SECRET.encode(), text.encode(), hashlib.sha256).hexdigest()[:20]


def _mrn(patient: int) -> str:
    return f"HOSP-MRN-{patient:06d}X"  # no such run of bytes occurs by chance


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMO_PATIENT_KEY", SECRET)  # the pneumo subprocesses inherit it


@pytest.fixture(scope="module")
def sources(shared_data: Path) -> list[Path]:
    """The 11 real labelled SIIM DICOMs (JPEG Baseline, distinct pixels)."""
    siim = shared_data / "siim"
    found = sorted((siim / "sample_images").glob("*.dcm")) + sorted(
        (siim / "dicom_train").glob("*.dcm")
    )
    assert len(found) == 11
    return found


def _copy(
    source: Path, out: Path, *, uid_seed: str, variant: int, patient_id: str | None, **more: str
) -> str:
    """A copy of ``source`` with a new SOPInstanceUID and the patient fields given
    (``patient_id`` None: no PatientID element at all). Variant 0 keeps the JPEG frame;
    variant n > 0 is uncompressed with the low bit of its first n pixels flipped."""
    ds = pydicom.dcmread(source)
    if variant:
        ds.decompress()
        pixels = bytearray(ds.PixelData)
        for i in range(variant):
            pixels[i] ^= 1
        ds.PixelData = bytes(pixels)
    uid = generate_uid(entropy_srcs=[uid_seed])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    if patient_id is None:
        del ds.PatientID
    else:
        ds.PatientID = patient_id
        ds.PatientName = patient_id  # as SIIM writes it: a leak of either would show
    for keyword, value in more.items():
        setattr(ds, keyword, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return uid


@pytest.fixture(scope="module")
def hospital(sources: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two batches of 8 patients x 3 images; patients 3 and 4 have images in both."""
    root = tmp_path_factory.mktemp("hospital")
    patient_of: dict[str, int] = {}
    for p in range(N_PATIENTS):
        for k in range(PER_PATIENT):
            i = p * PER_PATIENT + k
            in_a = p < 3 or (p < 5 and k < 2)
            path = root / ("a" if in_a else "b") / f"img-{i:03d}.dcm"
            uid = _copy(
                sources[i % 11],
                path,
                uid_seed=f"hospital-{i}",
                variant=i // 11,
                patient_id=_mrn(p),
            )
            patient_of[uid] = p
    return {"a": root / "a", "b": root / "b", "patient_of": patient_of}


def _rows(out: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in manifest.read(open_store(out)).to_pylist()}


def test_two_batches_put_every_dicom_patient_in_one_split(hospital, tmp_path, pneumo):
    out = tmp_path / "ds"
    fractions = ("--split-fractions", "0.5,0.25,0.25")  # three splits a patient could straddle
    first = pneumo("ingest", "dicom", str(hospital["a"]), "--out", str(out), *fractions)
    second = pneumo("ingest", "dicom", str(hospital["b"]), "--out", str(out))
    assert "warning" not in first.stderr + second.stderr  # every image has its PatientID
    rows = _rows(out)
    patient_of = hospital["patient_of"]
    assert set(rows) == set(patient_of)
    splits: dict[int, set[str]] = {}
    keys: dict[int, set[str]] = {}
    batches: dict[int, set[str]] = {}
    for image_id, r in rows.items():
        p = patient_of[image_id]
        splits.setdefault(p, set()).add(r["split"])
        keys.setdefault(p, set()).add(r["patient_key"])
        batches.setdefault(p, set()).add(r["batch"])
    assert all(len(s) == 1 for s in splits.values()), splits  # one split per patient
    assert all(len(k) == 1 for k in keys.values()) and len(set().union(*keys.values())) == 8
    for image_id, r in rows.items():
        assert r["patient_basis"] == "dicom-patient-id"
        assert r["patient_key"] == _key(f"dicom:PatientID:{_mrn(patient_of[image_id])}")
    assert {p for p, b in batches.items() if len(b) == 2} == {3, 4}  # in both batches
    assert len(set().union(*splits.values())) >= 2  # the split is not trivially one
    report = json.loads(pneumo("audit", str(out), "--format", "json").stdout)
    assert report["ok"] and report["image_level_images"] == 0
    assert report["bases"] == [
        {
            "dataset": "siim",
            "basis": "dicom-patient-id",
            "images": 24,
            "patients": 8,
            "image_level": False,
            "one_image_per_patient": False,
        }
    ]


def test_the_raw_patient_id_is_written_nowhere(hospital, sources, tmp_path, pneumo):
    # A truncated copy too: its quarantine row and the log lines must not quote its header.
    broken = tmp_path / "broken" / "img-cut.dcm"
    _copy(sources[0], broken, uid_seed="cut", variant=0, patient_id=_mrn(99))
    broken.write_bytes(broken.read_bytes()[:60_000])
    out = tmp_path / "ds"
    said = ""
    for folder in (hospital["a"], hospital["b"], broken.parent):
        proc = pneumo("--verbose", "ingest", "dicom", str(folder), "--out", str(out))
        said += proc.stdout + proc.stderr
    assert "quarantined 1" in said and len(_rows(out)) == 24
    raw_ids = [_mrn(p).encode() for p in [*range(N_PATIENTS), 99]]
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.suffix == ".tar" for f in files) and any("_delta_log" in f.parts for f in files)
    for f in files:  # shards (image, mask and JSON members), manifest, quarantine, records
        data = f.read_bytes()
        if f.suffix == ".parquet":  # compressed columns: look at the values
            data = repr(pq.read_table(f).to_pylist()).encode()
        assert not [raw for raw in raw_ids if raw in data], f
    assert not [raw for raw in raw_ids if raw.decode() in said]


def test_issuer_and_patient_id_name_the_patient_together(sources, tmp_path, pneumo):
    # One PatientID under two issuers (each with a JPEG copy, read by the lean reader, and
    # an uncompressed one, read by pydicom), and once with no issuer: three patients.
    folder = tmp_path / "src"
    scope_of = {}
    for i, issuer in enumerate(["SITE-A", "SITE-A", "SITE-B", "SITE-B", None]):
        extra = {"IssuerOfPatientID": issuer} if issuer else {}
        uid = _copy(
            sources[i],
            folder / f"img-{i}.dcm",
            uid_seed=f"issuer-{i}",
            variant=i % 2,
            patient_id="HOSP-MRN-SHARED",
            **extra,
        )
        scope_of[uid] = issuer or ""
    by_id, by_issuer = tmp_path / "by-id", tmp_path / "by-issuer"
    pneumo("ingest", "dicom", str(folder), "--out", str(by_id))
    attribute = ("--patient-attribute", "IssuerOfPatientID+PatientID")
    pneumo("ingest", "dicom", str(folder), "--out", str(by_issuer), *attribute)
    assert {r["patient_key"] for r in _rows(by_id).values()} == {
        _key("dicom:PatientID:HOSP-MRN-SHARED")
    }
    rows = _rows(by_issuer)
    for uid, r in rows.items():
        assert r["patient_basis"] == "dicom:IssuerOfPatientID+PatientID"
        ids = json.dumps([scope_of[uid], "HOSP-MRN-SHARED"])
        assert r["patient_key"] == _key(f"dicom:IssuerOfPatientID+PatientID:{ids}")
    assert len({r["patient_key"] for r in rows.values()}) == 3
    # Another rule changes the rows: on the same files it is another batch, not a rerun.
    again = pneumo("ingest", "dicom", str(folder), "--out", str(by_id), *attribute).stdout
    assert "already committed" not in again and "skipped 5 already in the dataset" in again


def test_both_readers_give_the_patient_attributes(sources, tmp_path):
    fields = {"IssuerOfPatientID": "SITE-C", "OtherPatientIDs": "ALT-1"}
    jpeg, plain = tmp_path / "jpeg.dcm", tmp_path / "plain.dcm"
    for path, variant in ((jpeg, 0), (plain, 1)):
        _copy(sources[0], path, uid_seed="r", variant=variant, patient_id="MRN-R", **fields)
    assert read_lean(jpeg.read_bytes()) is not None and read_lean(plain.read_bytes()) is None
    jpeg_ids = read_dicom(jpeg.read_bytes(), str(jpeg)).patient_ids
    assert jpeg_ids == read_dicom(plain.read_bytes(), str(plain)).patient_ids
    assert jpeg_ids.as_dict() == {**fields, "PatientID": "MRN-R"}
    assert "MRN-R" not in repr(jpeg_ids) + repr(read_dicom(jpeg.read_bytes(), "x"))
    # Several OtherPatientIDs (pydicom's path): their order does not make another patient.
    many = tmp_path / "many.dcm"
    _copy(sources[0], many, uid_seed="m", variant=0, patient_id="", OtherPatientIDs=["B", "A"])
    ids = read_dicom(many.read_bytes(), str(many)).patient_ids.as_dict()
    assert ids == {"OtherPatientIDs": "B\\A"}
    rule = DicomPatientRule.parse("OtherPatientIDs")
    assert rule.patient(ids, "x") == rule.patient({"OtherPatientIDs": "A\\B"}, "y")
    assert rule.patient(ids, "x").basis == "dicom:OtherPatientIDs"


@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("PatientID", "PatientID"),
        ("PatientID+IssuerOfPatientID", "IssuerOfPatientID+PatientID"),
        (" IssuerOfPatientID + PatientID ", "IssuerOfPatientID+PatientID"),
        ("OtherPatientIDs", "OtherPatientIDs"),
    ],
)
def test_a_patient_attribute_is_read_in_one_order(spec, canonical):
    assert DicomPatientRule.parse(spec).spec == canonical


@pytest.mark.parametrize(
    "spec, says",
    [
        ("PatientName", "expected one or more of"),
        ("patientid", "expected one or more of"),
        ("", "expected one or more of"),
        ("PatientID+", "expected one or more of"),
        ("PatientID+PatientID", "twice"),
        ("IssuerOfPatientID", "only scopes an id"),
    ],
)
def test_a_bad_patient_attribute_is_refused_in_one_line(spec, says, tmp_path, pneumo):
    with pytest.raises(ConfigError, match=says):
        DicomPatientRule.parse(spec)
    if spec == "PatientName":  # and the CLI says it before reading anything
        proc = pneumo(
            "ingest", "dicom", str(tmp_path), "--out", str(tmp_path / "ds"),
            "--patient-attribute", spec, check=False,
        )  # fmt: skip
        assert proc.returncode == 1 and proc.stderr.startswith("error: --patient-attribute")
        assert "Traceback" not in proc.stderr


def test_without_a_patient_id_each_image_is_its_own_patient_and_the_cli_says_so(
    shared_data, sources, tmp_path, pneumo
):
    # The real stage-2 test files have an empty PatientID; one copy has none at all.
    folder = tmp_path / "src"
    stage2 = sorted((shared_data / "siim" / "stage2_test").glob("*.dcm"))
    for path in stage2:
        (folder / path.name).parent.mkdir(exist_ok=True)
        (folder / path.name).write_bytes(path.read_bytes())
    _copy(sources[0], folder / "no-id.dcm", uid_seed="no-id", variant=0, patient_id=None)
    out = tmp_path / "ds"
    proc = pneumo("ingest", "dicom", str(folder), "--out", str(out))
    assert "warning: 11 images have no PatientID: each is its own patient" in proc.stderr
    assert "pseudonyms" not in proc.stderr  # that is the SIIM alias's warning
    rows = _rows(out)
    assert len(rows) == 11
    for image_id, r in rows.items():
        assert r["patient_basis"] == "dicom-image"
        assert r["patient_key"] == _key(f"dicom-image:{image_id}")
    report = json.loads(pneumo("audit", str(out), "--format", "json").stdout)
    assert report["image_level_images"] == 11
    assert "image-level patient basis" in pneumo("audit", str(out)).stdout


def test_a_test_list_forces_the_header_patient_without_the_xref(hospital, tmp_path, pneumo):
    # The list names one image of patient 6; its two other images are only found as his
    # by their header (the file names say nothing), before the batch splits anyone.
    patient_of = hospital["patient_of"]
    mine = sorted(uid for uid, p in patient_of.items() if p == 6)
    listed = tmp_path / "test-ids.txt"
    listed.write_text(mine[0] + "\n")
    fractions = "1,0,0"  # without the list, everyone would be train
    out = tmp_path / "ds"
    pneumo(
        "ingest", "dicom", str(hospital["b"]), "--out", str(out),
        "--split-fractions", fractions, "--test-list", str(listed), "--workers", "2",
    )  # fmt: skip
    splits = {uid: r["split"] for uid, r in _rows(out).items()}
    assert {splits[uid] for uid in mine} == {"test"}
    assert {s for uid, s in splits.items() if patient_of[uid] != 6} == {"train"}


def test_siim_files_split_by_image_without_the_xref_and_by_nih_patient_with_it(
    linked, tmp_path, pneumo
):
    dicoms = sorted(linked.siim_dir.rglob("*.dcm"))
    pid = {p.stem: str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in dicoms}
    assert len(set(pid.values())) == len(dicoms) == 11  # per-image pseudonyms
    siim, dicom = tmp_path / "siim", tmp_path / "dicom"
    proc = pneumo("ingest", "siim", str(linked.siim_dir), "--out", str(siim))
    assert "per-image pseudonyms" in proc.stderr and "--nih-xref" in proc.stderr
    rows = _rows(siim)
    for image_id, r in rows.items():
        assert r["patient_basis"] == "dicom-patient-id"
        assert r["patient_key"] == _key(f"dicom:PatientID:{pid[image_id]}")
    assert len({r["patient_key"] for r in rows.values()}) == 11  # one patient per image
    table = pneumo("audit", str(siim)).stdout
    assert "siim dicom-patient-id: one image per patient (11 images)" in table
    # `ingest dicom` is the same code: the same rows, without the SIIM warning.
    proc = pneumo("ingest", "dicom", str(linked.siim_dir), "--out", str(dicom))
    assert "warning" not in proc.stderr
    same = ("patient_key", "patient_basis", "split", "key", "content_sha256")
    assert {i: [r[c] for c in same] for i, r in _rows(dicom).items()} == {
        i: [r[c] for c in same] for i, r in rows.items()
    }
    # With the xref, the NIH patient wins over the PatientID.
    xref = tmp_path / "xref"
    pneumo(
        "ingest", "siim", str(linked.siim_dir), "--out", str(xref), "--nih-xref", str(linked.xref)
    )
    for image_id, r in _rows(xref).items():
        assert r["patient_basis"] == "nih-xref"
        assert r["patient_key"] == _key(f"nih:{linked.siim_patient[image_id]}")


def test_siim_images_the_xref_does_not_map_are_named_in_a_warning(
    linked, sources, tmp_path, pneumo
):
    folder = tmp_path / "src"
    mapped = sorted(linked.siim_dir.rglob("*.dcm"))[0]
    (folder / mapped.name).parent.mkdir(parents=True)
    (folder / mapped.name).write_bytes(mapped.read_bytes())
    _copy(sources[1], folder / "new.dcm", uid_seed="unmapped", variant=1, patient_id="PSEUDO-1")
    out = tmp_path / "ds"
    proc = pneumo("ingest", "siim", str(folder), "--out", str(out), "--nih-xref", str(linked.xref))
    assert "warning: 1 images are not in --nih-xref" in proc.stderr
    assert sorted(r["patient_basis"] for r in _rows(out).values()) == [
        "dicom-patient-id",
        "nih-xref",
    ]
