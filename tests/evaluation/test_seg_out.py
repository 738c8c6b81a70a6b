"""``predict --seg-out``: one DICOM SEG per real SIIM DICOM, its frame the CSV row's mask,
read back with highdicom and pydicom; then ingested as labels, mask for mask.

The run is the small one of ``trained_run`` (tests/evaluation/conftest.py), thresholded so
that on the real 1024 px images it calls some positive (partial masks) and some negative.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import logging
import shutil
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import boto3
import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import SegmentationStorage
from typer.testing import CliRunner, Result

from pneumo.cli import app
from pneumo.evaluation.dicom_seg import SegAlgorithm, SegWriter, build_seg
from pneumo.evaluation.inference import Predictor
from pneumo.evaluation.predict import PredictConfig, predict
from pneumo.ingest.rle import rle_decode
from pneumo.shards import manifest
from pneumo.shards.store import open_store


@dataclass(frozen=True)
class Predicted:
    inputs: Path  # the real DICOMs predicted
    csv_rows: dict[str, str]  # ImageId -> EncodedPixels
    segs: Path
    logged: str  # the command's output, its log (INFO) and every warning raised
    run: str


def _splitting_run(trained_run, inputs: Path, root: Path) -> str:
    """The trained run, with a triplet that calls about half of the real images positive:
    at a plain 0.5 threshold it calls them all positive (its searched triplet, none), so
    ``min_area`` is set between the middle two of their predicted areas."""
    run = root / "run-seg"
    shutil.copytree(trained_run.run, run)
    (run / "postprocess_search.json").unlink(missing_ok=True)
    post = {"top_threshold": 0.5, "min_area": 0, "mask_threshold": 0.5}
    (run / "postprocess.json").write_text(json.dumps(post))
    predict(PredictConfig(run=str(run), input=str(inputs), out_csv=str(root / "plain.csv")))
    rows = list(csv.reader(io.StringIO((root / "plain.csv").read_text())))[1:]
    areas = sorted(int(rle_decode(rle, 1024, 1024).sum()) for _, rle in rows)
    post["min_area"] = (areas[len(areas) // 2 - 1] + areas[len(areas) // 2]) // 2 + 1
    (run / "postprocess.json").write_text(json.dumps(post))
    return str(run)


@pytest.fixture(scope="module")
def predicted(
    trained_run, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Predicted:
    root = tmp_path_factory.mktemp("segout")
    inputs = root / "in"
    inputs.mkdir()
    siim = shared_data / "siim"
    for path in sorted((siim / "sample_images").glob("*.dcm")):
        shutil.copy(path, inputs / path.name)
    # A Kaggle stage-2 test file: empty study and series UIDs, so no SEG can reference it.
    shutil.copy(sorted((siim / "stage2_test").glob("*.dcm"))[0], inputs / "stage2.dcm")
    run = _splitting_run(trained_run, inputs, root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # --verbose: the log at INFO, pydicom's included, into the output (stderr).
        args = ["--verbose", "predict", run, str(inputs), "--out", str(root / "sub.csv")]
        args += ["--seg-out", str(root / "segs")]
        result = invoke(args)
    assert result.exit_code == 0, result.output
    logged = result.output + "\n".join(str(w.message) for w in caught)
    rows = list(csv.reader(io.StringIO((root / "sub.csv").read_text())))
    return Predicted(inputs, dict(rows[1:]), root / "segs", logged, run)


def invoke(args: list[str]) -> Result:
    """Run the CLI; then give the root logger back its handlers (the CLI's own would write
    to the runner's closed stream)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return CliRunner().invoke(app, args, catch_exceptions=False)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _sources(inputs: Path) -> dict[str, pydicom.Dataset]:
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(inputs.glob("*.dcm"))]
    return {str(h.SOPInstanceUID): h for h in heads}


def test_each_seg_reads_back_as_the_csv_rows_mask(predicted: Predicted) -> None:
    sources = _sources(predicted.inputs)
    written = {p.stem: p for p in predicted.segs.glob("*.dcm")}
    # Every sample image has its SEG; the stage-2 file (no study UID) has a CSV row only.
    stage2 = [i for i in sources if i.startswith("ID_")]
    assert len(stage2) == 1 and stage2[0] in predicted.csv_rows
    assert set(written) == set(predicted.csv_rows) - set(stage2)
    assert len(written) == 10
    positive = partial = 0
    for image_id, path in written.items():
        src = sources[image_id]
        want = rle_decode(predicted.csv_rows[image_id], src.Rows, src.Columns).astype(bool)
        seg = hd.seg.segread(path)
        frame = seg.get_pixels_by_source_instance([image_id])[0, :, :, 0]
        assert np.array_equal(frame.astype(bool), want), image_id
        ds = pydicom.dcmread(path)  # pydicom unpacks the 1-bit frame on its own
        assert ds.SOPClassUID == SegmentationStorage and ds.SegmentationType == "BINARY"
        assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == (src.Rows, src.Columns, 1)
        assert np.array_equal(ds.pixel_array.astype(bool), want), image_id
        positive += bool(want.any())
        partial += 0 < want.mean() < 0.5
    assert 0 < positive < 10, "the run must call some images positive and some negative"
    assert partial >= 1


def test_a_seg_names_its_finding_its_algorithm_and_its_source(predicted: Predicted) -> None:
    sources = _sources(predicted.inputs)
    version = importlib.metadata.version("pneumo")
    series = set()
    for path in sorted(predicted.segs.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        src = sources[path.stem]
        (segment,) = ds.SegmentSequence
        assert segment.SegmentLabel == "Pneumothorax"
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("36118008", "SCT")
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "pneumo" and algorithm.AlgorithmVersion == version
        assert "run=run-seg" in algorithm.AlgorithmParameters
        assert "checkpoint=best" in algorithm.AlgorithmParameters
        # Its source: same study and patient, referenced by series and instance UID.
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.PatientID == src.PatientID and ds.PatientName == src.PatientName
        (ref_series,) = ds.ReferencedSeriesSequence
        assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
        (ref,) = ref_series.ReferencedInstanceSequence
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ds.SOPInstanceUID != src.SOPInstanceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid
        series.add(ds.SeriesInstanceUID)
    assert len(series) == len({s.SeriesInstanceUID for s in sources.values() if s.StudyInstanceUID})


def test_no_patient_value_reaches_the_log_or_the_output(predicted: Predicted) -> None:
    values = set()
    for src in _sources(predicted.inputs).values():
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(src.get(keyword, "") or "")
            if len(value) > 3:
                values.add(value)
    assert len(values) >= 10  # the SIIM UUIDs: every sample file has its own
    assert "no SEG for" in predicted.logged  # the log was captured, the stage-2 file in it
    leaked = [v for v in values if v in predicted.logged]
    assert not leaked


def test_seg_uids_are_derived_from_the_run_the_source_and_the_mask(
    predicted: Predicted,
) -> None:
    path = sorted(predicted.inputs.glob("*.dcm"))[0]
    head = pydicom.dcmread(path, stop_before_pixels=True)
    algorithm = SegAlgorithm(run="r", checkpoint="best", step=3, version="1")
    mask = np.zeros((head.Rows, head.Columns), bool)

    def uids(m: np.ndarray, alg: SegAlgorithm) -> tuple[str, str]:
        ds = pydicom.dcmread(io.BytesIO(build_seg(head, m, alg)), stop_before_pixels=True)
        return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)

    first = uids(mask, algorithm)
    assert uids(mask, algorithm) == first  # the same inputs, the same UIDs
    other = mask.copy()
    other[5, 5] = True
    changed = uids(other, algorithm)
    assert changed[0] == first[0] and changed[1] != first[1]  # another mask: another SEG
    later = uids(mask, SegAlgorithm(run="r", checkpoint="best", step=4, version="1"))
    assert later[0] != first[0] and later[1] != first[1]  # another model: another series


def test_predicted_segs_ingest_back_to_the_same_masks(predicted: Predicted, tmp_path) -> None:
    args = ["ingest", "dicom", str(predicted.inputs), "--labels-seg", str(predicted.segs)]
    result = invoke([*args, "--out", str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    rows = {r["image_id"]: r for r in manifest.read(open_store(tmp_path / "ds")).to_pylist()}
    assert len(rows) == 11
    masks = _stored_masks(tmp_path / "ds")
    for image_id, rle in predicted.csv_rows.items():
        if image_id.startswith("ID_"):  # no SEG: stored unlabelled
            assert rows[image_id]["has_ptx"] is None and rows[image_id]["key"] not in masks
            continue
        want = rle_decode(rle, 1024, 1024).astype(bool)
        assert np.array_equal(masks[rows[image_id]["key"]], want), image_id
        assert rows[image_id]["has_ptx"] == bool(want.any())
    assert manifest.read(open_store(tmp_path / "ds"), table="quarantine").num_rows == 0


def _stored_masks(dataset: Path) -> dict[str, np.ndarray]:
    out = {}
    for tar in sorted(dataset.glob("shards/**/*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if ext == "mask.png":
                    out[key] = np.array(Image.open(io.BytesIO(tf.extractfile(m).read()))) > 0
    return out


def test_the_model_is_what_the_seg_says(predicted: Predicted) -> None:
    """The step the SEG names is the checkpoint's (the run's best)."""
    step = Predictor.load(predicted.run).checkpoint["step"]
    ds = pydicom.dcmread(next(predicted.segs.glob("*.dcm")), stop_before_pixels=True)
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert f"step={step}" in algorithm.AlgorithmParameters


def test_segs_go_to_s3(shared_data: Path, s3_bucket: str) -> None:
    path = sorted((shared_data / "siim" / "sample_images").glob("*.dcm"))[0]
    mask = np.zeros((1024, 1024), bool)
    mask[100:200, 300:350] = True
    writer = SegWriter(f"{s3_bucket}/out/segs", SegAlgorithm.of("s3://b/runs/r1/", "best", 7))
    name = writer.write(path.read_bytes(), mask)
    assert name == f"{path.stem}.dcm"
    body = (
        boto3.client("s3")
        .get_object(Bucket=s3_bucket.removeprefix("s3://"), Key=f"out/segs/{name}")["Body"]
        .read()
    )
    seg = hd.seg.segread(io.BytesIO(body))
    assert np.array_equal(seg.get_pixels_by_source_instance([path.stem])[0, :, :, 0], mask)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "run=r1" in algorithm.AlgorithmParameters
