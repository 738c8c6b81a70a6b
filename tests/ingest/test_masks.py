"""The hand-written 1-bit mask PNG reads back exactly, with cv2 and with Pillow."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pneumo.ingest.siim import encode_mask


@pytest.mark.parametrize("shape", [(1024, 1024), (7, 13), (1, 1), (256, 200)])
def test_mask_png_round_trips(shape):
    rng = np.random.default_rng(sum(shape))
    mask = (rng.random(shape) > 0.7).astype(np.uint8)
    data = encode_mask(mask)
    back_cv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back_cv.shape == shape and set(np.unique(back_cv)) <= {0, 255}
    assert ((back_cv > 0) == (mask > 0)).all()
    back_pil = np.array(Image.open(io.BytesIO(data)))
    assert back_pil.dtype == bool and (back_pil == (mask > 0)).all()
