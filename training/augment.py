"""Training augmentation: a horizontal flip and a mild affine, done with the resize in one warp.

The reference is :func:`reference_compose`, the albumentations pipeline the loader used
to run: ``HorizontalFlip(p=0.5)`` then ``Affine(scale=(0.9, 1.1), translate_percent=
(-0.06, 0.06), rotate=(-10, 10), p=0.7)`` with a constant 0 border, which draws the scale,
the translation and the rotation uniformly and the x and y scales and shifts
independently (albumentations' defaults: ``keep_ratio=False``, ``balanced_scale=False``).

:func:`draw` samples that same distribution from a seed, and :func:`matrix` composes
resize -> flip -> affine (albumentations' order and centre convention) into one 2x3
matrix, so a sample costs one ``cv2.warpAffine`` (about 0.5 ms at 512 px) instead of a
resize, a flip, albumentations' warp and its per-call bookkeeping. Measured on one core:
albumentations flip + affine 0.6-0.7 ms plus the resize; this path 0.4-0.6 ms in all.

Deliberate differences from the reference, none in the distribution of the geometry:

* the translation is continuous (albumentations truncates it to whole pixels);
* the resize is the same bilinear warp, from a source at most 2x the training size (the
  loader decodes JPEGs at 1/2, 1/4 or 1/8 scale in the DCT; a larger source is first
  reduced by area), instead of an area resize followed by a second interpolation;
* masks are warped bilinearly from their stored resolution and thresholded at one half
  (the reference resizes by area, thresholds, then warps nearest-neighbour): the same
  geometry with smoother edges, and no intermediate resize.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

FLIP_P = 0.5
AFFINE_P = 0.7
SCALE = (0.9, 1.1)  # per axis
TRANSLATE = (-0.06, 0.06)  # fraction of the side, per axis
ROTATE_DEG = (-10.0, 10.0)
# A source more than this many times the training size is first reduced by area, so the
# bilinear warp never skips pixels (at 2x it samples the centre of every 2x2 block).
MAX_WARP_REDUCTION = 2.0


@dataclass(frozen=True)
class Draw:
    """One sample's augmentation: what :func:`draw` chose."""

    flip: bool
    affine: bool
    scale: tuple[float, float] = (1.0, 1.0)  # (x, y)
    translate: tuple[float, float] = (0.0, 0.0)  # (x, y), fractions of the side
    rotate: float = 0.0  # degrees, counter-clockwise as albumentations

    @property
    def identity(self) -> bool:
        return not self.flip and not self.affine


NO_AUGMENT = Draw(flip=False, affine=False)


def draw(seed: int) -> Draw:
    """The augmentation of one sample, from ``seed`` alone (resumed runs redraw it)."""
    rng = np.random.default_rng(seed)
    flip = bool(rng.random() < FLIP_P)
    affine = bool(rng.random() < AFFINE_P)
    scale = rng.uniform(*SCALE, size=2)
    shift = rng.uniform(*TRANSLATE, size=2)
    rotate = float(rng.uniform(*ROTATE_DEG))
    if not affine:
        return Draw(flip=flip, affine=False)
    return Draw(
        flip=flip,
        affine=True,
        scale=(float(scale[0]), float(scale[1])),
        translate=(float(shift[0]), float(shift[1])),
        rotate=rotate,
    )


def matrix(d: Draw, src_shape: tuple[int, int], size: int) -> np.ndarray:
    """The forward 2x3 map from source pixels to output pixels: resize, flip, affine.

    Pixel centres map to pixel centres in the resize (``x' = (x + 0.5) * s - 0.5``, as
    ``cv2.resize``), and the affine turns about ``(size / 2 - 0.5, size / 2 - 0.5)``, as
    albumentations does.
    """
    rows, cols = src_shape
    sx, sy = size / cols, size / rows
    m = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    if d.flip:
        m = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    if d.affine:
        m = _affine(d, size) @ m
    return m[:2]


def _affine(d: Draw, size: int) -> np.ndarray:
    """albumentations' ``create_affine_transformation_matrix`` without shear."""
    c = size / 2 - 0.5
    angle = math.radians(d.rotate)
    cos, sin = math.cos(angle), math.sin(angle)
    (kx, ky), (tx, ty) = d.scale, (d.translate[0] * size, d.translate[1] * size)
    # centre <- translate <- rotate <- scale <- origin at the centre
    linear = np.array([[cos * kx, sin * ky], [-sin * kx, cos * ky]])
    shift = linear @ np.array([-c, -c]) + np.array([c + tx, c + ty])
    return np.array([[*linear[0], shift[0]], [*linear[1], shift[1]], [0.0, 0.0, 1.0]])


def apply(pixels: np.ndarray, d: Draw, size: int) -> np.ndarray:
    """``pixels`` (uint8 or float32, 2-D) resized to ``size`` x ``size`` and augmented by ``d``.

    Unaugmented, this is an area resize (what evaluation sees); augmented, one bilinear
    warp with a 0 border, after an area reduction when the source is more than twice the
    size. Masks go through here as 0/255 and are thresholded at 128 by the caller.
    """
    rows, cols = pixels.shape
    if d.identity:
        if (rows, cols) == (size, size):
            return pixels
        return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
    if max(rows, cols) > MAX_WARP_REDUCTION * size:
        pixels = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
    if not d.affine and pixels.shape == (size, size):
        return cv2.flip(pixels, 1)
    return cv2.warpAffine(
        pixels,
        matrix(d, pixels.shape, size),
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


# ---------------------------------------------------------------- the reference


def reference_compose() -> A.Compose:
    """The albumentations pipeline :func:`draw` and :func:`apply` reproduce (the per-file
    baseline of ``benchmarks/bench_loader.py`` runs it, and the tests compare the two)."""
    affine = A.Affine(
        scale=SCALE,
        translate_percent=TRANSLATE,
        rotate=ROTATE_DEG,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=0,
        p=AFFINE_P,
    )
    return A.Compose([A.HorizontalFlip(p=FLIP_P), affine])


def reference_augment(
    compose: A.Compose, image: np.ndarray, mask: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``compose`` on one sample, its random choices taken from ``seed`` alone."""
    # One generator shared by all transforms: Compose.set_random_seed would give each
    # transform its own generator with the same seed, and correlate flip with affine.
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
    out = compose(image=image, mask=mask)
    return out["image"], out["mask"]
