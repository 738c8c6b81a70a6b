"""``predict``: DICOMs -> SIIM submission CSV whose RLE decodes to the model's masks."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import boto3
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.inference import Predictor
from evaluation.predict import PredictConfig, predict
from ingest.rle import rle_decode
from shards.errors import ConfigError
from training.data import LoaderConfig, eval_batches


@pytest.fixture(scope="module")
def plain_run(trained_run, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The trained run with a plain 0.5 threshold: this weak model then predicts partial
    masks on every image, which is what the RLE round trip needs to be tested on."""
    run = tmp_path_factory.mktemp("plain") / "run"
    shutil.copytree(trained_run.run, run)
    post = {"top_threshold": 0.5, "min_area": 0, "mask_threshold": 0.5}
    (run / "postprocess.json").write_text(json.dumps(post))
    return str(run)


def read_csv(text: str) -> dict[str, str]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["ImageId", "EncodedPixels"]
    return dict(rows[1:])


def model_masks(run: str, dataset: str) -> dict[str, np.ndarray]:
    """The masks straight from the model, fed from the dataset's shards by the training
    loader (not from the DICOM files), upscaled and post-processed."""
    predictor = Predictor.load(run)
    loader = LoaderConfig(
        dataset=dataset,
        where="dataset == 'siim'",
        size=predictor.size,
        batch_size=5,
        workers=0,
        augment=False,
    )
    out = {}
    for batch in eval_batches(loader, rank=0, world_size=1):
        probs = predictor.probabilities(batch["image"])
        for image_id, prob, size in zip(batch["image_id"], probs, batch["orig_size"], strict=True):
            full = F.interpolate(prob[None, None], size=tuple(size), mode="bilinear")
            out[image_id] = predictor.post.apply(full[0, 0].numpy())
    return out


def test_submission_decodes_to_the_models_masks(trained_run, plain_run, tmp_path: Path) -> None:
    out_csv = tmp_path / "submission.csv"
    summary = predict(
        PredictConfig(
            run=plain_run,
            input=str(trained_run.dicoms),
            out_csv=str(out_csv),
            overlays_dir=str(tmp_path / "png"),
        )
    )
    submitted = read_csv(out_csv.read_text())
    expected = model_masks(plain_run, trained_run.dataset)
    assert summary["n_images"] == len(submitted) == len(expected) == 80
    assert summary["n_failed"] == 0
    assert set(submitted) == set(expected)  # ImageId = SOPInstanceUID
    partial = 0
    for image_id, rle in submitted.items():
        mask = expected[image_id]
        decoded = rle_decode(rle, *mask.shape).astype(bool)
        assert np.array_equal(decoded, mask), image_id
        partial += 0 < mask.mean() < 1
    assert partial >= 40  # the round trip was tested on real partial masks
    assert summary["n_positive"] == sum(rle != "-1" for rle in submitted.values())

    overlay = tmp_path / "png" / f"{next(iter(submitted))}.png"
    with Image.open(overlay) as im:
        assert im.mode == "RGB" and im.size == (128, 128)  # the demo's original size


def test_bad_files_are_reported_and_the_rest_goes_on(trained_run, tmp_path: Path) -> None:
    inputs = tmp_path / "in" / "nested"
    inputs.mkdir(parents=True)
    good = sorted(trained_run.dicoms.rglob("*.dcm"))[:2]
    for path in good:
        shutil.copy(path, inputs / path.name)
    (inputs / "not-dicom.dcm").write_bytes(b"hello, this is text" * 20)
    (inputs / "truncated.dcm").write_bytes(good[0].read_bytes()[:2000])
    summary = predict(
        PredictConfig(
            run=trained_run.run,
            input=str(tmp_path / "in"),
            out_csv=str(tmp_path / "out.csv"),
            batch_size=3,
        )
    )
    assert summary["n_images"] == 2 and summary["n_failed"] == 2
    assert sorted(Path(f["source"]).name for f in summary["failed"]) == [
        "not-dicom.dcm",
        "truncated.dcm",
    ]
    assert all(f["reason"] for f in summary["failed"])
    ids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in good}
    assert set(read_csv((tmp_path / "out.csv").read_text())) == ids


def test_one_file_and_s3_in_and_out(trained_run, tmp_path: Path, s3_bucket: str) -> None:
    one = sorted(trained_run.dicoms.rglob("*.dcm"))[0]
    single = predict(
        PredictConfig(run=trained_run.run, input=str(one), out_csv=str(tmp_path / "one.csv"))
    )
    assert single["n_images"] == 1

    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for path in sorted(trained_run.dicoms.rglob("*.dcm"))[:3]:
        s3.upload_file(str(path), bucket, f"incoming/{path.parent.name}/{path.name}")
    summary = predict(
        PredictConfig(
            run=trained_run.run,
            input=f"{s3_bucket}/incoming",
            out_csv=f"{s3_bucket}/out/submission.csv",
            overlays_dir=f"{s3_bucket}/out/overlays",
        )
    )
    assert summary["n_images"] == 3
    text = s3.get_object(Bucket=bucket, Key="out/submission.csv")["Body"].read().decode()
    assert len(read_csv(text)) == 3
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="out/overlays/")["KeyCount"]
    assert listed == 3


def test_an_input_without_dicoms_is_a_clear_error(trained_run, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no .dcm"):
        predict(
            PredictConfig(run=trained_run.run, input=str(tmp_path), out_csv=str(tmp_path / "x.csv"))
        )


def test_predictions_are_deterministic(trained_run) -> None:
    predictor = Predictor.load(trained_run.run)
    images = torch.rand(2, 1, predictor.size, predictor.size)
    assert torch.equal(predictor.probabilities(images), predictor.probabilities(images))
