"""Decoding, augmentation and the batches of training/data.py, on real chest X-rays."""

from __future__ import annotations

import io
import logging
from collections import Counter

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pneumo.shards.errors import ConfigError
from pneumo.training import augment, data, decode
from pneumo.training.data import LoaderConfig
from pneumo.training.runs import as_float

SIZE = 64


def cfg(ds, **kw) -> LoaderConfig:
    base = dict(dataset=ds.url, size=SIZE, batch_size=4, workers=0, seed=3)
    return LoaderConfig(**{**base, **kw})


def sample_of(ds, key: str) -> dict:
    return {"__key__": key, "__shard__": ds.row(key)["shard"], **ds.members[key]}


def first_key(ds, fmt: str, depth: int = 8, positive: bool | None = None) -> str:
    return next(
        r["key"] for r in ds.rows
        if r["image_format"] == fmt and r["bit_depth"] == depth
        and (positive is None or r["has_ptx"] is positive)
    )  # fmt: skip


def train(c: LoaderConfig, **kw) -> list[dict]:
    args = dict(rank=0, world_size=1, epoch=0, steps_per_epoch=5, total_steps=50)
    return list(data.train_batches(c, **{**args, **kw}))


# ---------------------------------------------------------------- decoding


def test_jpeg_decodes_reduced_to_size_and_close_to_a_full_decode(dataset):
    key = first_key(dataset, "jpeg")
    sample = sample_of(dataset, key)
    image, mask = decode.decode_sample(sample, SIZE)
    assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
    full = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L"))
    assert full.shape == (1024, 1024)
    reference = cv2.resize(full, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert np.abs(image.astype(int) - reference).mean() < 2.0
    assert image.std() > 20  # a chest X-ray, not a blank


def test_png_8_bit_decodes_exactly(dataset):
    key = first_key(dataset, "png", 8)
    png = dataset.members[key]["png"]
    image, _ = decode.decode_sample(sample_of(dataset, key), SIZE)
    pixels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(
        image, cv2.resize(pixels, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    )


def test_png_16_bit_is_windowed_to_unit_range_by_its_percentiles(dataset):
    key16 = first_key(dataset, "png", 16)
    image, _ = decode.decode_sample(sample_of(dataset, key16), SIZE)
    assert image.dtype == np.float32 and image.shape == (SIZE, SIZE)
    assert image.min() == 0.0 and image.max() == 1.0
    assert 0.002 < (image == 1.0).mean() < 0.03  # clipped above the 99.5th percentile
    # the 16-bit image was made from an 8-bit one: same picture
    raw = cv2.imdecode(np.frombuffer(dataset.members[key16]["png"], np.uint8), cv2.IMREAD_UNCHANGED)
    eight = cv2.resize(
        ((raw - 100) // 16).astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_AREA
    )
    assert np.corrcoef(image.ravel(), eight.ravel())[0, 1] > 0.99


def test_colour_png_keeps_its_first_channel():
    grey = np.tile(np.arange(256, dtype=np.uint8), (32, 1))
    rgb = np.dstack([grey, np.zeros_like(grey), np.full_like(grey, 255)])
    ok, png = cv2.imencode(".png", rgb[..., ::-1])  # cv2 writes BGR: R is the PNG's first
    image, orig = decode.decode_image(png.tobytes(), "png", 32)
    assert orig == (32, 256)
    np.testing.assert_array_equal(image, cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA))


def test_masks_0_255_and_0_1_decode_alike_and_a_missing_mask_is_empty(dataset):
    positives = [r["key"] for r in dataset.rows if r["has_ptx"]]
    for key in positives:
        png = dataset.members[key]["mask.png"]
        raw = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        mask = decode.decode_mask(png, SIZE)
        assert set(np.unique(mask)) == {0, 1}
        expected = (raw > 0).mean()
        assert abs(mask.mean() - expected) < 0.02, key
    assert {
        int(cv2.imdecode(np.frombuffer(dataset.members[k]["mask.png"], np.uint8), 0).max())
        for k in positives
    } == {1, 255}  # fmt: skip  (both encodings are exercised)
    negative = first_key(dataset, "jpeg", positive=False)
    _, mask = decode.decode_sample(sample_of(dataset, negative), SIZE)
    assert mask.shape == (SIZE, SIZE) and not mask.any()


def test_a_broken_image_names_the_sample():
    with pytest.raises(decode.SampleError, match="k1 of some.tar"):
        decode.decode_sample({"__key__": "k1", "__shard__": "some.tar", "png": b"nope"}, SIZE)


# ---------------------------------------------------------------- augmentation


def _augmented(image: np.ndarray, mask: np.ndarray, seed: int, size: int):
    d = augment.draw(seed)
    out_mask = augment.apply(mask * np.uint8(255), d, size) >= 128
    return augment.apply(image, d, size), out_mask.astype(np.uint8), d


def test_augmentation_moves_image_and_mask_together_and_is_seeded():
    image = np.full((128, 128), 20, np.uint8)
    image[30:70, 40:90] = 230
    mask = (image > 100).astype(np.uint8)
    changed = 0
    for seed in range(40):
        out_image, out_mask, _ = _augmented(image, mask, seed, 128)
        assert out_mask.sum() > 0.7 * mask.sum()
        on_square = out_image[out_mask == 1] > 125
        assert on_square.mean() > 0.97, f"seed {seed}: mask left the bright square"
        off_square = out_image[out_mask == 0] > 125
        assert off_square.mean() < 0.03
        changed += not np.array_equal(out_mask, mask)
        again = _augmented(image, mask, seed, 128)
        assert np.array_equal(again[0], out_image) and np.array_equal(again[1], out_mask)
    assert changed > 20  # flips and affines happen (p 0.5 and 0.7)


def test_draws_follow_the_documented_distribution():
    draws = [augment.draw(seed) for seed in range(4000)]
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.03
    affine = [d for d in draws if d.affine]
    assert abs(len(affine) / len(draws) - 0.7) < 0.03
    scale = np.array([d.scale for d in affine])
    shift = np.array([d.translate for d in affine])
    rotate = np.array([d.rotate for d in affine])
    for values, lo, hi in ((scale, 0.9, 1.1), (shift, -0.06, 0.06), (rotate, -10, 10)):
        assert lo <= values.min() and values.max() <= hi  # uniform over the whole range
        assert values.min() < lo + 0.02 * (hi - lo) and values.max() > hi - 0.02 * (hi - lo)
        assert abs(values.mean() - (lo + hi) / 2) < 0.03 * (hi - lo)
    # x and y scale (and shift) drawn independently, as albumentations' keep_ratio=False
    assert abs(np.corrcoef(scale.T)[0, 1]) < 0.1 and abs(np.corrcoef(shift.T)[0, 1]) < 0.1
    # flip and affine independent: flips are half of the affine draws too
    assert abs(np.mean([d.flip for d in affine]) - 0.5) < 0.04


def _albumentations(d: augment.Draw, image: np.ndarray, mask: np.ndarray, size: int):
    """albumentations' own transforms with the draw's values (translation in whole pixels)."""
    steps = [A.HorizontalFlip(p=1.0)] if d.flip else []
    tx, ty = (round(t * size) for t in d.translate)
    steps.append(
        A.Affine(scale={"x": d.scale[0], "y": d.scale[1]}, translate_px={"x": tx, "y": ty},
                 rotate=(d.rotate, d.rotate), border_mode=cv2.BORDER_CONSTANT, p=1.0)
    )  # fmt: skip
    out = A.Compose(steps)(image=image, mask=mask)
    return (
        out["image"],
        out["mask"],
        augment.Draw(
            flip=d.flip,
            affine=True,
            scale=d.scale,
            translate=(tx / size, ty / size),
            rotate=d.rotate,
        ),
    )


def test_one_warp_matches_albumentations_flip_and_affine(dataset):
    key = first_key(dataset, "jpeg", positive=True)
    image, mask = decode.decode_sample(sample_of(dataset, key), 128)
    compared = 0
    for seed in range(30):
        d = augment.draw(seed)
        if not d.affine:
            continue
        ref_image, ref_mask, same = _albumentations(d, image, mask, 128)
        ours = augment.apply(image, same, 128)
        ours_mask = augment.apply(mask * np.uint8(255), same, 128) >= 128
        assert np.abs(ours.astype(int) - ref_image).mean() < 1.0, seed  # bilinear both
        inter, union = (ours_mask & (ref_mask > 0)).sum(), (ours_mask | (ref_mask > 0)).sum()
        assert inter / union > 0.95, seed  # nearest (theirs) against bilinear + half (ours)
        compared += 1
    assert compared > 15


def test_the_warp_maps_pixel_centres_like_cv2():
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    plain = augment.Draw(flip=False, affine=True)  # an affine that does nothing
    # resize by 2 in the warp == area resize (the warp samples each 2x2 block's centre)
    halved = augment.apply(noise, plain, 128).astype(int)
    assert np.abs(halved - cv2.resize(noise, (128, 128), interpolation=cv2.INTER_AREA)).max() <= 1
    # flips and a half turn about the image centre are exact
    flipped = augment.Draw(flip=True, affine=True)
    assert np.array_equal(augment.apply(noise, flipped, 256), cv2.flip(noise, 1))
    half_turn = augment.Draw(flip=False, affine=True, rotate=180.0)
    assert np.array_equal(augment.apply(noise, half_turn, 256), cv2.flip(noise, -1))


def test_a_large_source_is_reduced_by_area_before_the_warp():
    stripes = np.zeros((1024, 1024), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: any skipped pixel shows
    d = next(augment.draw(s) for s in range(100) if augment.draw(s).affine)
    out = augment.apply(stripes, d, 64)
    inside = out[24:40, 24:40]  # away from the 0 border the affine may bring in
    assert np.abs(inside.astype(int) - 128).max() < 8


def test_resize_and_augment_in_one_warp_matches_resize_then_augment(dataset):
    """From the JPEG's 1/2-scale decode (2x the size) straight to the augmented image."""
    key = first_key(dataset, "jpeg")
    jpg = dataset.members[key]["jpg"]
    big, orig = decode._read_image(jpg, "jpg", 128)
    assert orig == (1024, 1024) and big.shape == (128, 128)  # 1/8 scale in the DCT
    big, _ = decode._read_image(jpg, "jpg", 100)
    assert big.shape == (128, 128)  # 1/8 still >= 100; the warp reduces the rest
    big, _ = decode._read_image(jpg, "jpg", 200)
    assert big.shape == (256, 256)
    small = cv2.resize(big, (200, 200), interpolation=cv2.INTER_AREA)
    for seed in range(12):
        d = augment.draw(seed)
        one = augment.apply(big, d, 200)
        two = augment.apply(small, d, 200)
        assert np.abs(one.astype(int) - two).mean() < 2.0, seed


# ---------------------------------------------------------------- batches


def test_batches_have_the_documented_shapes_and_types(dataset):
    batches = train(cfg(dataset))
    assert len(batches) == 5
    dtypes = set()
    for b in batches:
        # uint8 when every sample is 8-bit, else float32 in [0, 1] (a 16-bit sample)
        sixteen = [dataset.row(k)["bit_depth"] == 16 for k in b["key"]]
        assert b["image"].dtype == (torch.float32 if any(sixteen) else torch.uint8)
        dtypes.add(b["image"].dtype)
        assert b["image"].shape == (4, 1, SIZE, SIZE)
        assert 0 <= as_float(b["image"]).min() and as_float(b["image"]).max() <= 1
        assert b["mask"].shape == (4, 1, SIZE, SIZE) and b["mask"].dtype == torch.uint8
        assert set(b["mask"].unique().tolist()) <= {0, 1}
        assert b["has_ptx"].dtype == torch.bool and b["has_ptx"].shape == (4,)
        assert b["labelled"].all()
        assert len(b["key"]) == len(b["image_id"]) == len(b["orig_size"]) == 4
        for key, image_id, has_ptx, mask, orig in zip(
            b["key"], b["image_id"], b["has_ptx"], b["mask"], b["orig_size"], strict=True
        ):
            row = dataset.row(key)
            assert row["split"] == "train" and row["has_ptx"] is not None
            assert image_id == row["image_id"] and orig == (row["rows"], row["cols"])
            assert bool(has_ptx) == row["has_ptx"] == bool(mask.any())
    assert dtypes == {torch.uint8, torch.float32}  # both kinds of batch were seen
    three = train(cfg(dataset, in_channels=3), steps_per_epoch=1)[0]["image"]
    assert three.shape == (4, 3, SIZE, SIZE)
    assert torch.equal(three[:, 0], three[:, 2])


def test_workers_0_and_1_give_the_same_batches(dataset):
    zero, one = train(cfg(dataset, workers=0)), train(cfg(dataset, workers=1))
    assert [b["key"] for b in zero] == [b["key"] for b in one]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(zero, one, strict=True))


@pytest.mark.parametrize("variant", ["dataset", "one_shard_dataset"])
def test_loader_workers_give_every_rank_the_same_count_and_resume_exactly(variant, request):
    ds = request.getfixturevalue(variant)
    c = cfg(ds, workers=2, pos_rate=(0.8, 0.2))
    for rank in range(3):
        full = train(c, rank=rank, world_size=3, steps_per_epoch=7, epoch=1)
        assert len(full) == 7 and all(len(b["key"]) == 4 for b in full)
    resumed = train(c, rank=2, world_size=3, steps_per_epoch=7, epoch=1, start_step=3)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[3:]]
    for a, b in zip(resumed, full[3:], strict=True):  # same augmentation, too
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_pos_rate_one_gives_positives_only(dataset):
    batches = train(cfg(dataset, pos_rate=(1.0, 1.0)))
    assert all(b["has_ptx"].all() and b["mask"].flatten(1).amax(1).all() for b in batches)


def test_unlabelled_samples_are_never_trained_on(dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="pneumo.training.data"):
        batches = train(cfg(dataset, where="split == 'train'", batch_size=8), steps_per_epoch=12)
    assert "2 unlabelled samples left out" in caplog.text
    seen = {k for b in batches for k in b["key"]}
    assert seen and seen <= dataset.keys("train")


def test_eval_covers_each_sample_once_unaugmented(dataset):
    expected = dataset.keys("val")
    got: Counter[str] = Counter()
    for rank in range(2):
        for b in data.eval_batches(cfg(dataset, workers=2, batch_size=3), rank=rank, world_size=2):
            got.update(b["key"])
            for key, image in zip(b["key"], as_float(b["image"]), strict=True):
                plain, _ = decode.decode_sample(sample_of(dataset, key), SIZE)
                if plain.dtype == np.uint8:  # numpy's float32 division, not torch's
                    plain = plain.astype(np.float32) / np.float32(255)
                assert torch.equal(image[0], torch.from_numpy(plain))
    assert got == Counter(expected)


def test_bad_settings_are_refused(dataset):
    with pytest.raises(ConfigError):
        cfg(dataset, in_channels=2)
    with pytest.raises(ConfigError):
        cfg(dataset, pos_rate=(0.2, 1.2))
    with pytest.raises(ConfigError):
        train(cfg(dataset), rank=1, world_size=1)
    with pytest.raises(ConfigError):
        train(cfg(dataset, where="split == 'nothing'"))


def test_bench_loader_measures_samples_per_second(dataset):
    calls = []
    rate = data.bench_loader(cfg(dataset), 0.3, progress=lambda done, total: calls.append(done))
    assert rate > 0 and calls and calls[-1] == pytest.approx(0.3)


@pytest.mark.integration
def test_s3_batches_equal_local_batches(dataset, s3_dataset):
    local = train(cfg(dataset, workers=2, pos_rate=(0.7, 0.3)), start_step=1)
    remote = train(cfg(s3_dataset, workers=2, pos_rate=(0.7, 0.3)), start_step=1)
    assert [b["key"] for b in remote] == [b["key"] for b in local]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(local, remote, strict=True))
    got = Counter(k for b in data.eval_batches(cfg(s3_dataset, workers=2), rank=0, world_size=1)
                  for k in b["key"])  # fmt: skip
    assert got == Counter(dataset.keys("val"))
