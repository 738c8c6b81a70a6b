"""The SIIM score and the post-processing triplet, on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation.postprocess import PostProcess, PostProcessSearch, search
from training.metrics import dice_per_image, overlap_counts, siim_summary


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


def test_score_is_the_mean_over_images_not_over_pixels() -> None:
    pred, truth = masks(4), masks(4)
    truth[0, :, :] = True
    pred[0, :, :4] = True  # Dice 2*32/(32+64) = 2/3 on a huge mask
    pred[1, 0, 0] = True  # 0: stray pixel
    # images 2 and 3: empty/empty, 1 each
    dice = dice_per_image(pred, truth)
    assert dice.tolist() == pytest.approx([2 / 3, 0.0, 1.0, 1.0])
    summary = siim_summary(dice, overlap_counts(pred, truth)[2])
    assert summary["dice"] == pytest.approx((2 / 3 + 0 + 1 + 1) / 4)
    assert summary["dice_pos"] == pytest.approx(2 / 3)
    assert summary["dice_neg"] == pytest.approx(2 / 3)  # 2 of 3 healthy images kept empty
    assert summary["empty_dice"] == 0.75  # what predicting nothing would score
    assert (summary["n_images"], summary["n_positive"]) == (4, 1)


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
    assert best.top_threshold >= 0.5 and best.mask_threshold <= 0.3
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


def test_json_round_trip_and_validation() -> None:
    triplet = PostProcess(0.75, 2000, 0.4)
    assert PostProcess.from_dict(json.loads(json.dumps(triplet.to_dict()))) == triplet
    with pytest.raises(ValueError):
        PostProcess(1.5, 0, 0.5)
    with pytest.raises(ValueError):
        PostProcess(0.5, -1, 0.5)
