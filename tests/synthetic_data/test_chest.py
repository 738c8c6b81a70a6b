"""The synthetic chest radiograph: its pneumothorax is exactly its mask, and it is seeded."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pneumo.synthetic.chest import synth_chest


def _high_freq(image: np.ndarray) -> np.ndarray:
    f = image.astype(np.float32)
    return np.abs(f - cv2.GaussianBlur(f, (0, 0), 2))


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_synth_chest_pneumothorax_is_exactly_the_mask(size: int) -> None:
    """Same rng state without the pneumothorax: the images differ exactly on the mask
    (darker) and on the thin pleural line just outside it (brighter)."""
    line = max(2, round(size / 128)) + 1
    for i in range(4):
        image, mask = synth_chest(np.random.default_rng([11, i]), size, positive=True)
        plain, empty = synth_chest(np.random.default_rng([11, i]), size, positive=False)
        assert image.shape == mask.shape == (size, size) and image.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 1} and not empty.any()
        assert 0.005 < mask.mean() < 0.12
        inside = mask.astype(bool)
        diff = plain.astype(np.int16) - image
        assert (diff[inside] > 0).all() and diff[inside].mean() > 25
        near = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=line).astype(bool)
        assert (diff[~inside] <= 0).all() and not diff[~near].any()
        assert (diff[near & ~inside] < 0).any()  # the pleural line


def test_synth_chest_pneumothorax_has_no_lung_markings() -> None:
    with_air, without = 0.0, 0.0
    for i in range(12):
        image, mask = synth_chest(np.random.default_rng([12, i]), 256, positive=True)
        plain, _ = synth_chest(np.random.default_rng([12, i]), 256, positive=False)
        core = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=3).astype(bool)
        with_air += _high_freq(image)[core].sum()
        without += _high_freq(plain)[core].sum()
    assert with_air < 0.85 * without


def test_synth_chest_is_seeded_by_its_rng_only() -> None:
    first, again, other = (
        synth_chest(np.random.default_rng(s), 256, positive=True)[0] for s in (5, 5, 6)
    )
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other).mean() > 1
    negative = synth_chest(np.random.default_rng(5), 256, positive=False)[0]
    assert negative.std() > 20  # a chest, not a blank
