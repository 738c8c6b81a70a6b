"""``predict``: DICOMs -> SIIM submission CSV whose RLE decodes to the model's masks."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import boto3
import cv2
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pneumo.evaluation.inference import Predictor
from pneumo.evaluation.predict import PredictConfig, overlay_caption, predict
from pneumo.ingest.rle import rle_decode
from pneumo.shards.errors import ConfigError
from pneumo.training.data import LoaderConfig, eval_batches


@pytest.fixture(scope="module")
def plain_run(trained_run, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The trained run with a plain 0.5 threshold: this weak model then predicts partial
    masks on every image, which is what the RLE round trip needs to be tested on."""
    run = tmp_path_factory.mktemp("plain") / "run"
    shutil.copytree(trained_run.run, run)
    post = {"top_threshold": 0.5, "min_area": 0, "mask_threshold": 0.5}
    (run / "postprocess.json").write_text(json.dumps(post))
    (run / "postprocess_search.json").unlink()
    return str(run)


def read_csv(text: str) -> dict[str, str]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["ImageId", "EncodedPixels"]
    return dict(rows[1:])


def model_masks(run: str, dataset: str) -> dict[str, tuple[np.ndarray, float]]:
    """The masks straight from the model, fed from the dataset's shards by the training
    loader (not from the DICOM files), upscaled and post-processed; and the highest
    probability of each upscaled map."""
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
            full = F.interpolate(prob[None, None], size=tuple(size), mode="bilinear")[0, 0]
            out[image_id] = predictor.post.apply(full.numpy()), float(full.max())
    return out


def test_submission_decodes_to_the_models_masks(
    trained_run, plain_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captions: dict[str, tuple[float, bool]] = {}

    def caption(image_id: str, max_prob: float, positive: bool) -> list[str]:
        captions[image_id] = (max_prob, positive)
        return overlay_caption(image_id, max_prob, positive)

    monkeypatch.setattr("pneumo.evaluation.predict.overlay_caption", caption)
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
        mask = expected[image_id][0]
        decoded = rle_decode(rle, *mask.shape).astype(bool)
        assert np.array_equal(decoded, mask), image_id
        partial += 0 < mask.mean() < 1
    assert partial >= 40  # the round trip was tested on real partial masks
    assert summary["n_positive"] == sum(rle != "-1" for rle in submitted.values())

    check_overlays(tmp_path / "png", trained_run.dicoms, expected)
    # Each caption names its image and the highest probability of its full-size map.
    assert set(captions) == set(expected)
    for image_id, (max_prob, positive) in captions.items():
        assert max_prob == pytest.approx(expected[image_id][1], abs=1e-5)
        assert positive == bool(expected[image_id][0].any())
    assert overlay_caption("1.2.3", 0.8766, True) == ["1.2.3", "max p 0.877: pneumothorax"]


def check_overlays(folder: Path, dicoms: Path, expected: dict) -> None:
    """Each overlay is its image at full resolution (128 px, not the model's 64 upscaled),
    with the mask tinted, and a caption band naming the image and its probability."""
    sharper = 0
    for path in sorted(dicoms.rglob("*.dcm"))[:6]:
        ds = pydicom.dcmread(path)
        image_id, grey = str(ds.SOPInstanceUID), ds.pixel_array.astype(np.float32)
        mask = expected[image_id][0]
        with Image.open(folder / f"{image_id}.png") as im:
            assert im.mode == "RGB" and im.size == (128, 128)  # the demo's original size
            rgb = np.asarray(im).astype(np.float32)
        band = 32  # the caption's two lines cover less than this at 128 px
        clear = ~mask
        clear[:band] = False
        # Untinted pixels are the full-resolution image (±1: JPEG decoders differ).
        assert np.abs(rgb[..., 1] - grey)[clear].mean() < 0.6, image_id
        blurred = cv2.resize(cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA), (128, 128))
        sharper += np.abs(blurred - grey)[clear].mean() > 2.0  # what a 64 px copy would show
        tinted = rgb[mask & (np.arange(128)[:, None] >= band)]
        assert (tinted[:, 0] > tinted[:, 2] + 20).all()  # orange over grey
        assert (rgb[:band] >= 250).all(axis=-1).any()  # white caption text
        assert rgb[:band].mean() < grey[:band].mean()  # on a darkened band
    assert sharper >= 3  # the comparison can tell a full-resolution image from a blurred one


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
