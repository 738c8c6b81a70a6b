"""Synthetic chest X-rays: the one place pneumo draws pictures of chests.

- :func:`synth_chest`: a cartoon radiograph whose pneumothorax is meant to be easy to learn
  (darker, unmarked, bounded by a pleural line), with its exact mask. The demo archives
  (:mod:`pneumo.synthetic.archives`) are made of these, so that a short CPU training run
  on the demo has something real to find.
- :func:`block_xray`: grey noise, a positive with a bright block in its upper left quarter:
  the "finding" a tiny CNN learns in a few dozen steps (the tests' NIH stand-in).
- :func:`textured_frame`: a smooth textured grey picture that costs a JPEG decoder what a
  chest does (the GPU benchmark's frames).

Each takes a ``numpy.random.Generator`` as its only source of randomness: the same
generator state draws the same picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_LOW_RES = 256  # anatomy is drawn at most this big and upscaled; the pneumothorax at full size
_N_VERTICES = 256


@dataclass(frozen=True, kw_only=True)
class _Lung:
    """A lung field in coordinates normalised to the image side (x right, y down)."""

    cx: float
    cy: float
    ax: float
    ay: float
    lateral: float  # -1: the lung on the image's left, +1: on its right

    def outline(self, retract: np.ndarray | None = None) -> np.ndarray:
        """Closed outline, ``(N, 2)``; ``retract`` (per vertex, 0..1) pulls it to the centre.

        The outline is star-shaped about the centre, so any retraction stays inside it.
        """
        t = np.linspace(0.0, 2 * np.pi, _N_VERTICES, endpoint=False)
        narrow = 0.85 + 0.15 * np.sin(t)  # narrower at the apex (sin < 0 is up)
        dome = np.sign(np.sin(t)) * np.abs(np.sin(t)) ** np.where(np.sin(t) > 0, 0.6, 1.0)
        scale = 1.0 if retract is None else 1.0 - retract
        x = self.cx + self.ax * np.cos(t) * narrow * scale
        y = self.cy + self.ay * dome * scale  # flattened base: the diaphragm
        return np.stack([x, y], axis=1)


def _fill(poly: np.ndarray, size: int) -> np.ndarray:
    """Rasterise a normalised polygon into a ``(size, size)`` uint8 0/1 mask."""
    canvas = np.zeros((size, size), np.uint8)
    pts = np.round(poly * size * 16).astype(np.int32)  # 4 fractional bits (shift=4)
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return canvas


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _lungs(rng: np.random.Generator) -> tuple[_Lung, _Lung]:
    j = rng.uniform(-1, 1, 6)
    cy = 0.47 + 0.03 * j[0]
    right = _Lung(
        cx=0.29 + 0.02 * j[1], cy=cy, ax=0.18 + 0.015 * j[2], ay=0.29 + 0.03 * j[3], lateral=-1
    )
    left = _Lung(
        cx=0.71 + 0.02 * j[4], cy=cy + 0.01, ax=0.17 + 0.015 * j[5], ay=0.28 + 0.02 * j[3],
        lateral=1,
    )  # fmt: skip
    return right, left


def _retraction(rng: np.random.Generator, lung: _Lung) -> np.ndarray:
    """How far (0..1) the collapsed lung pulls back from the chest wall, per outline vertex.

    The pleural air sits laterally, at the apex, or wraps around both, on one smooth arc.
    """
    t = np.linspace(0.0, 2 * np.pi, _N_VERTICES, endpoint=False)
    phi = rng.uniform(np.pi - 0.35, 1.5 * np.pi + 0.25)  # costophrenic .. lateral .. apical
    if lung.lateral > 0:
        phi = np.pi - phi  # mirror for the lung on the image's right
    half_width = rng.uniform(0.8, 1.6)
    depth = rng.uniform(0.2, 0.55)
    delta = np.angle(np.exp(1j * (t - phi)))
    window = np.where(np.abs(delta) < half_width, np.cos(0.5 * np.pi * delta / half_width), 0.0)
    ripple = 1.0 + 0.15 * np.sin(rng.integers(2, 5) * t + rng.uniform(0, 2 * np.pi))
    return np.clip(depth * window**2 * ripple, 0.0, 0.9)


def _pneumothorax(rng: np.random.Generator, lung: _Lung) -> np.ndarray:
    """A collapsed-lung outline whose gap to ``lung`` covers about 1-6% of the image."""
    full = _area(lung.outline())
    for _ in range(8):
        inner = lung.outline(_retraction(rng, lung))
        if 0.01 <= full - _area(inner) <= 0.06:
            break
    return inner


def _clean(mask: np.ndarray) -> np.ndarray:
    """Drop one-pixel slivers and stray pixels: keep the largest piece of the opened mask."""
    x, y, w, h = cv2.boundingRect(mask)
    crop = mask[y : y + h, x : x + w]
    opened = cv2.morphologyEx(crop, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if count > 1:  # else the band is too thin to open: keep it as drawn
        crop[:] = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return mask


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _vessels(rng: np.random.Generator, lung: _Lung, lo: int) -> np.ndarray:
    """Branching vessel-like lines fanning out from the hilum (0..1, not yet clipped)."""
    canvas = np.zeros((lo, lo), np.float32)
    n, steps = 34, 9
    hilum = np.array([lung.cx - 0.45 * lung.ax * lung.lateral, lung.cy - 0.03])
    base = np.where(lung.lateral < 0, np.pi, 0.0) + rng.uniform(-1.7, 1.7, n)
    angles = base[:, None] + np.cumsum(rng.normal(0, 0.28, (n, steps)), axis=1)
    length = rng.uniform(0.025, 0.045, (n, 1)) * np.ones((1, steps))
    walk = np.cumsum(np.stack([np.cos(angles), np.sin(angles)], -1) * length[..., None], 1)
    pts = hilum + np.concatenate([np.zeros((n, 1, 2)), walk], axis=1)
    pts = np.round(pts * lo * 16).astype(np.int32)
    cv2.polylines(canvas, list(pts[:, :4]), False, 1.0, 2, cv2.LINE_AA, 4)
    cv2.polylines(canvas, list(pts[:, 3:]), False, 0.75, 1, cv2.LINE_AA, 4)
    return cv2.GaussianBlur(canvas, (0, 0), 0.6)


def _ribs(rng: np.random.Generator, lo: int) -> np.ndarray:
    """Posterior rib arcs: they leave the spine, rise a little, then bend down laterally."""
    canvas = np.zeros((lo, lo), np.float32)
    first, gap = rng.uniform(0.11, 0.15), rng.uniform(0.055, 0.065)
    u = np.linspace(0.0, 1.0, 24)  # 0 at the spine, 1 at the lateral chest wall
    tops = first + gap * np.arange(10) + rng.normal(0, 0.004, 10)
    drop = rng.uniform(0.12, 0.17)
    y = tops[:, None] - 0.015 * np.sin(np.pi * u) + drop * u**2.5
    ribs = []
    for side in (-1.0, 1.0):
        x = 0.5 + side * (0.035 + 0.37 * u) * np.ones_like(y)
        ribs += list(np.round(np.stack([x, y], -1) * lo * 16).astype(np.int32))
    cv2.polylines(canvas, ribs, False, 1.0, max(1, round(0.02 * lo)), cv2.LINE_AA, 4)
    return cv2.GaussianBlur(canvas, (0, 0), 0.8)


def _solid(rng: np.random.Generator, lo: int) -> np.ndarray:
    """Mediastinum (widening from the neck down) and heart: 0..1 at ``lo`` px."""
    yy, xx = np.mgrid[0:lo, 0:lo].astype(np.float32) / lo
    width = 0.045 + 0.03 * np.clip(yy / 0.45, 0, 1)
    med = np.exp(-(((xx - 0.5) / width) ** 4)) * (yy > 0.04)
    hx, hy, ha, hb = rng.uniform([0.53, 0.65, 0.13, 0.10], [0.57, 0.69, 0.17, 0.13])
    heart = (((xx - hx) / ha) ** 2 + ((yy - hy) / hb) ** 2 < 1).astype(np.float32)
    return np.maximum(med, cv2.GaussianBlur(heart, (0, 0), 0.01 * lo))


def _anatomy(rng: np.random.Generator, fields: np.ndarray, solid: np.ndarray) -> np.ndarray:
    """Body, lung fields (dark, unmarked), mediastinum, heart and ribs at ``lo`` px."""
    lo = fields.shape[0]
    levels = rng.uniform([10, 140, 65, 185, 18], [30, 170, 90, 215, 28])
    bg, soft, lung, dense, rib = (float(v) for v in levels)
    yy, xx = np.mgrid[0:lo, 0:lo].astype(np.float32) / lo
    body = ((xx - 0.5) / 0.48) ** 2 + ((yy - 0.62) / 0.64) ** 2 < 1
    img = cv2.GaussianBlur(np.where(body, soft, bg).astype(np.float32), (0, 0), 0.02 * lo)
    soft_fields = cv2.GaussianBlur(fields, (0, 0), 0.006 * lo)
    gradient = 14 * (yy - 0.47) / 0.3 + 10 * (1 - np.abs(xx - 0.5) / 0.35)  # denser low/medial
    img -= soft_fields * (soft - lung - gradient)
    img = img * (1 - solid) + dense * solid
    thorax = cv2.dilate(soft_fields, np.ones((5, 5), np.uint8)) * (1 - 0.6 * solid)
    img += rib * _ribs(rng, lo) * thorax
    grain = rng.standard_normal((lo, lo), dtype=np.float32)  # quantum noise, at most 256 px
    return (img + 6 * _smooth_noise(rng, 6, lo) + 1.5 * grain).astype(np.float32)


def _markings(
    rng: np.random.Generator, lungs: tuple[_Lung, _Lung], fields: np.ndarray, solid: np.ndarray
) -> np.ndarray:
    """Lung markings (vessels + mottling) at ``lo`` px: what a pneumothorax lacks."""
    lo = fields.shape[0]
    lines = np.minimum(sum(_vessels(rng, lung, lo) for lung in lungs), 1.0)
    mottle = _smooth_noise(rng, lo // 4, lo)
    gain = float(rng.uniform(24, 34))
    return ((gain * lines + 8 * mottle) * fields * (1 - solid)).astype(np.float32)


def synth_chest(
    rng: np.random.Generator, size: int, *, positive: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic chest radiograph and its pneumothorax mask.

    Dark lung fields with vessel markings inside a brighter body, mediastinum, heart and
    rib arcs. A pneumothorax is a band along the lateral and/or apical edge of a lung (now
    and then both lungs) where the markings vanish and the field is darker and uniform,
    bounded on the inner side by a thin bright pleural line; the mask is exactly that band
    (the pleural line is outside it). With the same ``rng`` state, ``positive=False`` gives
    the same chest without the pneumothorax: the images differ only inside the mask and on
    the pleural line.

    Args:
        rng: the only source of randomness.
        size: output side in pixels (>= 64).
        positive: whether to draw a pneumothorax; ``None`` decides with a fair coin from ``rng``.

    Returns:
        ``(image, mask)``: ``(size, size)`` uint8 grey image and uint8 0/1 mask (all zero
        for a negative).
    """
    if positive is None:
        positive = bool(rng.random() < 0.5)
    lo = min(size, _LOW_RES)
    lungs = _lungs(rng)
    fields = np.maximum(*(_fill(lung.outline(), lo) for lung in lungs)).astype(np.float32)
    solid = _solid(rng, lo)
    anatomy, markings = _anatomy(rng, fields, solid), _markings(rng, lungs, fields, solid)
    if lo != size:
        anatomy = cv2.resize(anatomy, (size, size), interpolation=cv2.INTER_LINEAR)
        markings = cv2.resize(markings, (size, size), interpolation=cv2.INTER_LINEAR)
    air, line, contrast, shift = (
        float(v) for v in rng.uniform([36, 30, 0.85, -10], [48, 45, 1.15, 10])
    )
    # Drawn last, so that the same rng state gives the same chest with or without it.
    mask = np.zeros((size, size), np.uint8)
    if positive:  # the air has no markings, is darker, and has a pleural line on its inner side
        pleura = np.zeros((size, size), np.uint8)
        sides = (0, 1) if rng.random() < 0.25 else (int(rng.integers(2)),)
        for side in sides:
            _add_pneumothorax(rng, lungs[side], mask, pleura)
        markings[mask.view(bool)] = -air
        markings += np.float32(line) * pleura
    img = anatomy + markings
    img = (img - 110) * contrast + (110 + shift)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _add_pneumothorax(
    rng: np.random.Generator, lung: _Lung, mask: np.ndarray, pleura: np.ndarray
) -> None:
    """OR one pneumothorax of ``lung`` into ``mask`` and its pleural line into ``pleura``."""
    size = mask.shape[0]
    inner = _pneumothorax(rng, lung)
    region = _fill(lung.outline(), size) & (1 - _fill(inner, size))
    region = _clean(region)
    line = np.zeros_like(mask)
    pts = np.round(inner * size * 16).astype(np.int32)
    cv2.polylines(line, [pts], True, 1, max(2, round(size / 170)), cv2.LINE_8, 4)
    # Only the half of the line on the lung's side, and only along the air: a visceral pleura.
    near = cv2.dilate(region, np.ones((3, 3), np.uint8), iterations=max(2, round(size / 128)))
    np.bitwise_or(pleura, line & near & (1 - region), out=pleura)
    np.bitwise_or(mask, region, out=mask)


def block_xray(rng: np.random.Generator, positive: bool, side: int = 64) -> np.ndarray:
    """A grey noisy image; a positive one has a bright block in a random spot of its upper
    left quarter (the "finding" a small CNN learns in a few dozen steps)."""
    pixels = rng.normal(100, 25, (side, side))
    if positive:
        y, x = rng.integers(2, side // 2 - side // 4, size=2)
        pixels[y : y + side // 4, x : x + side // 4] += 90
    return np.clip(pixels, 0, 255).astype(np.uint8)


def textured_frame(rng: np.random.Generator, side: int = 1024) -> np.ndarray:
    """A smooth grey picture with texture, ``(side, side)`` uint8: costs a JPEG decoder what
    a chest does."""
    low = cv2.resize(rng.random((16, 16)).astype(np.float32), (side, side))
    noise = rng.normal(0, 12, (side, side)).astype(np.float32)
    return np.clip(40 + 160 * low + noise, 0, 255).astype(np.uint8)
