"""``pneumo predict``: DICOMs in, a SIIM submission CSV (and optional overlays) out.

Flow: list the inputs (one ``.dcm`` file, a folder searched recursively, or an ``s3://``
prefix); for each file, read it exactly as ingest stores it (:func:`ingest.dicom.read_dicom`:
the JPEG frame as it is, or a lossless PNG of other encodings) and decode that the way the
training loader does (:func:`training.data.decode_image`), so a model sees at prediction
time what it saw in training; predict at the run's size, upscale the probabilities to the
image's own rows x cols (bilinear), apply the run's post-processing triplet, and write
``ImageId,EncodedPixels`` rows: ImageId = SOPInstanceUID (the file stem when missing),
EncodedPixels = the relative, column-major SIIM RLE (``-1`` when empty).

A file that cannot be read or decoded is reported (``failed`` in the summary, a warning in
the log) and left out of the CSV; the others go on.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from evaluation.inference import Predictor
from ingest.dicom import BadInput, read_dicom
from ingest.rle import rle_encode
from ingest.sources import SourceFile, list_sources, read_source
from shards.errors import ConfigError, StoreError
from shards.store import is_s3_url, open_store, write_url
from training.data import decode_image

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
OVERLAY_COLOUR = np.array([255, 64, 0], np.float32)  # RGB: orange over grey
OVERLAY_ALPHA = 0.45


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    """What to predict and where to write it.

    Attributes:
        run: the RUN of a segmentation training.
        input: a ``.dcm`` file, a folder (searched recursively) or an ``s3://`` prefix.
        out_csv: the submission CSV (local path or ``s3://`` object).
        overlays_dir: folder or ``s3://`` prefix for one PNG per image; None: no overlays.
        tta: horizontal-flip test-time augmentation.
        checkpoint: ``best``, ``last``, or a checkpoint URL.
        batch_size: images per forward pass.
    """

    run: str
    input: str
    out_csv: str
    overlays_dir: str | None = None
    tta: bool = False
    checkpoint: str = "best"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")


@dataclass(frozen=True, kw_only=True)
class _Image:
    """One decoded input, ready for the model."""

    source: str
    image_id: str
    rows: int
    cols: int
    pixels: np.ndarray  # float32 [size, size] in [0, 1]


def predict(cfg: PredictConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Predict every DICOM of ``cfg.input``; returns a summary.

    The summary: ``n_images`` (rows written), ``n_positive``, ``n_failed``, ``failed``
    (``[{"source", "reason"}]``), ``out_csv``, ``overlays_dir``. ``progress`` gets
    ``{"done", "total"}`` after each batch.

    Raises:
        ConfigError: the input names no DICOM file.
        CheckpointError: the run has no such checkpoint.
    """
    sources = _inputs(cfg.input)
    predictor = Predictor.load(cfg.run, cfg.checkpoint, tta=cfg.tta)
    overlays = open_store(cfg.overlays_dir) if cfg.overlays_dir else None
    rows: list[tuple[str, str]] = []
    failed: list[dict[str, str]] = []
    done = 0
    for chunk in _chunks(sources, cfg.batch_size):
        images = [_read(src, predictor.size, failed) for src in chunk]
        images = [im for im in images if im is not None]
        for image, mask in zip(images, _masks(predictor, images), strict=True):
            rows.append((image.image_id, rle_encode(mask)))
            if overlays is not None:
                overlays.put(f"{_safe_name(image.image_id)}.png", overlay_png(image, mask))
        done += len(chunk)
        if progress is not None:
            progress({"done": done, "total": len(sources)})
    write_url(cfg.out_csv, submission_csv(rows))
    n_positive = sum(rle != "-1" for _, rle in rows)
    log.info("%d images predicted (%d positive), %d failed", len(rows), n_positive, len(failed))
    return {
        "n_images": len(rows),
        "n_positive": n_positive,
        "n_failed": len(failed),
        "failed": failed,
        "out_csv": cfg.out_csv,
        "overlays_dir": cfg.overlays_dir,
        "postprocess": predictor.post.to_dict(),
    }


def _inputs(path: str) -> list[SourceFile]:
    """The DICOM files named by ``path``: itself if it is a file, else every ``*.dcm`` below."""
    if not is_s3_url(path) and Path(path).is_file():
        p = Path(path)
        return [SourceFile(str(p.parent), p.name, p.stat().st_size)]
    sources = list_sources(path, [".dcm"])
    if not sources:
        raise ConfigError(f"no .dcm file under {path}")
    return sources


def _chunks(items: list[SourceFile], n: int) -> Iterator[list[SourceFile]]:
    for start in range(0, len(items), n):
        yield items[start : start + n]


def _read(src: SourceFile, size: int, failed: list[dict[str, str]]) -> _Image | None:
    """Read and decode one file as training saw its images; None (and a report) on failure."""
    try:
        dicom = read_dicom(read_source(src), src.name)
        suffix = "jpg" if dicom.image_format == "jpeg" else "png"
        pixels, _ = decode_image(dicom.image_bytes, suffix, size)
    except (BadInput, StoreError, OSError, ValueError, cv2.error) as e:
        log.warning("%s: %s", src.name, e)
        failed.append({"source": src.name, "reason": str(e)})
        return None
    if pixels.dtype == np.uint8:
        pixels = pixels.astype(np.float32) / 255.0
    return _Image(
        source=src.name, image_id=dicom.image_id, rows=dicom.rows, cols=dicom.cols, pixels=pixels
    )


def _masks(predictor: Predictor, images: list[_Image]) -> list[np.ndarray]:
    """Post-processed bool masks at each image's original size."""
    if not images:
        return []
    batch = torch.from_numpy(np.stack([im.pixels for im in images])[:, None])
    if predictor.in_channels > 1:
        batch = batch.repeat(1, predictor.in_channels, 1, 1)
    probs = predictor.probabilities(batch)
    masks = []
    for image, prob in zip(images, probs, strict=True):
        full = F.interpolate(prob[None, None], size=(image.rows, image.cols), mode="bilinear")
        masks.append(predictor.post.apply(full[0, 0].cpu().numpy()))
    return masks


def submission_csv(rows: list[tuple[str, str]]) -> bytes:
    """``ImageId,EncodedPixels`` CSV bytes (LF line ends, as the SIIM sample submissions)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ImageId", "EncodedPixels"])
    writer.writerows(rows)
    return out.getvalue().encode()


def overlay_png(image: _Image, mask: np.ndarray) -> bytes:
    """The grey image at its original size with the mask blended in colour, as PNG."""
    grey = cv2.resize(image.pixels, (image.cols, image.rows), interpolation=cv2.INTER_LINEAR)
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=2)
    rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * OVERLAY_COLOUR
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("cannot encode the overlay PNG")
    return data.tobytes()


def _safe_name(image_id: str) -> str:
    """A file name for an image id (UIDs are dotted: dots are fine in a file name)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in image_id) or "image"
