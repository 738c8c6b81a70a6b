"""The SIIM score and the post-processing triplet, on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pneumo.metrics.siim import (
    PostProcess,
    PostProcessSearch,
    dice_per_image,
    overlap_counts,
    search,
    siim_summary,
)


def masks(n: int, size: int = 8) -> np.ndarray:
    return np.zeros((n, size, size), bool)


def test_empty_truth_and_empty_prediction_scores_one() -> None:
    assert dice_per_image(masks(1), masks(1)).tolist() == [1.0]


def test_one_side_empty_scores_zero() -> None:
    pred, truth = masks(2), masks(2)
    pred[0, 0, 0] = True  # one stray pixel on a healthy image
    truth[1, 2:4, 2:4] = True  # a missed pneumothorax
    assert dice_per_image(pred, truth).tolist() == [0.0, 0.0]


def test_partial_overlap_exact_value() -> None:
    pred, truth = masks(1), masks(1)
    pred[0, 0, 0:4] = True  # 4 pixels
    truth[0, 0, 2:8] = True  # 6 pixels, 2 shared
    assert dice_per_image(pred, truth)[0] == pytest.approx(2 * 2 / (4 + 6))


def test_score_is_the_mean_over_all_images_not_positives_only() -> None:
    """Overall, positives-only (MONAI's ignore_empty) and healthy-only means all differ."""
    pred, truth = masks(5), masks(5)
    truth[0, :, :] = True
    pred[0, :, :4] = True  # positive, Dice 2*32/(32+64) = 2/3 on a huge mask
    truth[1, 2:4, 2:4] = True
    pred[1, 2:4, 2:4] = True  # positive, perfect: 1
    pred[2, 0, 0] = True  # healthy with one stray pixel: 0
    # images 3 and 4: healthy, predicted empty: 1 each
    dice = dice_per_image(pred, truth)
    assert dice.tolist() == pytest.approx([2 / 3, 1.0, 0.0, 1.0, 1.0])
    summary = siim_summary(dice, overlap_counts(pred, truth)[2])
    assert summary["dice"] == pytest.approx((2 / 3 + 1 + 0 + 1 + 1) / 5)  # 0.7333
    assert summary["dice_pos"] == pytest.approx((2 / 3 + 1) / 2)  # 0.8333, ignore_empty's
    assert summary["dice_neg"] == pytest.approx(2 / 3)  # 2 of 3 healthy images kept empty
    assert summary["empty_dice"] == pytest.approx(3 / 5)  # what predicting nothing scores
    assert (summary["n_images"], summary["n_positive"]) == (5, 2)


def test_torch_and_numpy_agree_and_accept_channel_dim() -> None:
    rng = np.random.default_rng(0)
    pred, truth = rng.random((5, 1, 16, 16)) > 0.7, rng.random((5, 1, 16, 16)) > 0.8
    truth[2] = False
    pred[2] = False
    expected = dice_per_image(pred, truth)
    got = dice_per_image(torch.from_numpy(pred), torch.from_numpy(truth).float())
    assert got.tolist() == pytest.approx(expected.tolist())
    assert expected[2] == 1.0


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ"):
        dice_per_image(masks(2, 8), masks(2, 16))


# --- post-processing --------------------------------------------------------------------


def blob_map(size: int, core: float, rim: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """A probability map: ``core`` inside ``box``, ``rim`` one pixel around it, 0 elsewhere."""
    prob = np.zeros((size, size), np.float32)
    r0, r1, c0, c1 = box
    prob[r0 - 1 : r1 + 1, c0 - 1 : c1 + 1] = rim
    prob[r0:r1, c0:c1] = core
    return prob


def test_apply_calls_an_image_positive_only_with_enough_confident_pixels() -> None:
    prob = blob_map(64, core=0.9, rim=0.4, box=(10, 20, 10, 20))  # 100 core px, 44 rim px
    # 100 px of 64x64 is 100 * 256 = 25600 px of a 1024x1024 image.
    kept = PostProcess(top_threshold=0.8, min_area=25_600, mask_threshold=0.3).apply(prob)
    assert kept.sum() == 144  # core + rim: the mask uses the lower threshold
    dropped = PostProcess(top_threshold=0.8, min_area=25_601, mask_threshold=0.3).apply(prob)
    assert not dropped.any()
    plain = PostProcess().apply(prob)  # 0.5 / 0 / 0.5: a plain threshold
    assert plain.sum() == 100


def test_apply_works_on_a_batch_per_image() -> None:
    big = blob_map(32, 0.9, 0.0, (4, 14, 4, 14))
    small = blob_map(32, 0.9, 0.0, (4, 6, 4, 6))
    out = PostProcess(0.5, 4096 * 10, 0.5).apply(np.stack([big, small]))  # 10 px at 32x32
    assert out[0].sum() == 100 and out[1].sum() == 0


def test_search_finds_the_triplet_that_removes_noise_and_keeps_the_rim() -> None:
    size = 64
    probs, truths = [], []
    for i in range(6):
        if i % 2 == 0:  # positive: confident core, less confident true rim
            probs.append(blob_map(size, 0.95, 0.35, (20, 30, 20 + i, 30 + i)))
            truth = np.zeros((size, size), bool)
            truth[19:31, 19 + i : 31 + i] = True
        else:  # negative: a few confident false pixels
            probs.append(blob_map(size, 0.95, 0.0, (5, 7, 5, 7)))
            truth = np.zeros((size, size), bool)
        truths.append(truth)
    probs_a, truths_a = np.stack(probs), np.stack(truths)
    best = search(probs_a, truths_a)
    assert best.mask_threshold <= 0.3  # 0.35 on the true rim: only 0.2 and 0.3 keep it
    # 4 false pixels at 64x64 = 1024 at 1024x1024; a 100-pixel core = 25600.
    assert 1024 < best.min_area <= 25_600
    assert dice_per_image(best.apply(probs_a), truths_a).mean() == pytest.approx(1.0)
    assert dice_per_image(PostProcess().apply(probs_a), truths_a).mean() < 0.6


def test_search_batches_and_merged_parts_match_one_pass() -> None:
    rng = np.random.default_rng(1)
    probs = rng.random((6, 32, 32)).astype(np.float32)
    truths = probs + rng.normal(0, 0.2, probs.shape) > 0.8
    whole = PostProcessSearch()
    whole.add(probs, truths)
    parts = []
    for start in (0, 2, 4):
        part = PostProcessSearch()
        part.add(torch.from_numpy(probs[start : start + 2]), torch.from_numpy(truths[start:][:2]))
        parts.append(part)
    merged = PostProcessSearch.merged(parts)
    np.testing.assert_allclose(merged.scores(), whole.scores())
    assert merged.best() == whole.best()


def test_probabilities_exactly_on_a_threshold_do_not_count_in_search_or_apply() -> None:
    """``>`` everywhere: a pixel at exactly the threshold is out, in the search as in apply.

    0.5 and 0.75 are exact in binary, so the maps hold exactly the threshold values.
    """
    size = 32
    prob = np.zeros((2, size, size), np.float32)
    truth = np.zeros((2, size, size), bool)
    prob[0, 4:8, 4:8] = 0.9  # 16 px, true
    truth[0, 4:8, 4:8] = True
    prob[0, 20:24, 20:24] = 0.5  # 16 px exactly on the mask threshold, healthy tissue
    prob[1, 10:20, 10:20] = 0.75  # a healthy image: 100 px exactly on the top threshold

    # 16 px of 32x32 = 16384 px of 1024x1024: the core of image 0 just meets min_area.
    post = PostProcess(top_threshold=0.75, min_area=16_384, mask_threshold=0.5)
    out = post.apply(prob)
    assert out[0].sum() == 16 and out[0][4:8, 4:8].all()  # the 0.5 pixels stay out
    assert not out[1].any()  # 0.75 is not above 0.75: image 1 is not called
    assert dice_per_image(out, truth).tolist() == [1.0, 1.0]

    finder = PostProcessSearch(
        top_thresholds=(0.75,), min_areas=(0, 16_384), mask_thresholds=(0.5,)
    )
    finder.add(prob, truth)
    # min_area 0 calls every image, so image 1's 0.75 px (above the 0.5 mask threshold) are
    # its mask: (1 + 0) / 2. With min_area 16384, only strictly-above-0.75 pixels count:
    # image 1 is not called, image 0 is, and its 0.5 px stay out of the mask: (1 + 1) / 2.
    assert finder.scores()[0, :, 0].tolist() == [0.5, 1.0]
    # Read from the other side: a threshold just below the value does count the pixels.
    below = PostProcessSearch(top_thresholds=(0.74,), min_areas=(0,), mask_thresholds=(0.49,))
    below.add(prob, truth)
    # image 0: 16 true + 16 false px: 2*16/48; image 1: 100 false px: 0.
    assert below.scores()[0, 0, 0] == pytest.approx((2 * 16 / 48 + 0.0) / 2)


def test_apply_on_torch_tensors_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    probs = rng.random((3, 16, 16)).astype(np.float32)
    post = PostProcess(0.8, 30_000, 0.4)  # 30000 of 1024^2 = 7.3 px at 16x16
    got = post.apply(torch.from_numpy(probs))
    assert isinstance(got, torch.Tensor)
    expected = post.apply(probs)
    assert np.array_equal(got.numpy(), expected)
    assert 0 < expected.sum() < expected.size  # neither all nor nothing: a real comparison


def test_json_round_trip_and_validation() -> None:
    triplet = PostProcess(0.75, 2000, 0.4, tta=True)
    assert PostProcess.from_dict(json.loads(json.dumps(triplet.to_dict()))) == triplet
    older = {"top_threshold": 0.75, "min_area": 2000, "mask_threshold": 0.4}  # before TTA
    assert PostProcess.from_dict(older).tta is False
    with pytest.raises(ValueError):
        PostProcess(1.5, 0, 0.5)
    with pytest.raises(ValueError):
        PostProcess(0.5, -1, 0.5)
    with pytest.raises(ValueError):
        PostProcess(0.5, 0, 0.5, tta="yes")  # type: ignore[arg-type]


def test_search_records_the_tta_setting_of_its_maps() -> None:
    finder = PostProcessSearch(tta=True)
    finder.add(np.full((1, 8, 8), 0.9, np.float32), np.ones((1, 8, 8), bool))
    merged = PostProcessSearch.merged([finder])
    assert finder.best()[0].tta is True and merged.best()[0].tta is True
