"""``pneumo predict``: DICOMs in, a SIIM submission CSV (and optional overlays) out.

Flow: list the inputs (one ``.dcm`` file, a folder searched recursively, or an ``s3://``
prefix); for each file, read it exactly as ingest stores it (:func:`pneumo.ingest.dicom.read_dicom`:
the JPEG frame as it is, or a lossless PNG of other encodings) and decode that the way the
training loader does (:func:`pneumo.training.decode.decode_image`), so a model sees at prediction
time what it saw in training; predict at the run's size, upscale the probabilities to the
image's own rows x cols (bilinear), apply the run's post-processing triplet, and write
``ImageId,EncodedPixels`` rows: ImageId = SOPInstanceUID (the file stem when missing),
EncodedPixels = the relative, column-major SIIM RLE (``-1`` when empty).

SEGs (optional, ``seg_dir``): one DICOM Segmentation per image, its frame the CSV row's mask
(see :mod:`pneumo.evaluation.dicom_seg`).

Beside the CSV, ``<out>.details.csv`` (:func:`details_csv`) holds per image the image-level
probability, the same under the run's temperature (``calibration.json``, written by
``pneumo evaluate segment --calibrate``) and the flip uncertainty (both defined in
:mod:`pneumo.evaluation.calibration`; computing the latter costs a mirrored forward pass
when TTA is off).

Overlays (optional) show the mask on the image at its full resolution, with the image id
and the image's highest pixel probability (its score as a positive) written on it.

A file that cannot be read or decoded is reported (``failed`` in the summary, a warning in
the log) and left out of the CSV; the others go on.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pneumo.evaluation.calibration import flip_probabilities, load_temperature
from pneumo.evaluation.dicom_seg import SegAlgorithm, SegError, SegWriter
from pneumo.evaluation.inference import Predictor
from pneumo.ingest.dicom import BadInput, read_dicom
from pneumo.ingest.rle import rle_encode
from pneumo.ingest.sources import SourceFile, list_sources, read_source
from pneumo.metrics.calibration import scale_probability
from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.members import SUFFIX_OF_FORMAT
from pneumo.shards.store import is_s3_url, open_store, write_url
from pneumo.training.decode import decode_image
from pneumo.training.fullres import upsample

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
        seg_dir: folder or ``s3://`` prefix for one DICOM SEG per image; None: no SEGs.
        tta: horizontal-flip test-time augmentation; None: as the run's post-processing
            was chosen (each setting is applied with the triplet searched under it).
        checkpoint: ``best``, ``last``, or a checkpoint URL.
        batch_size: images per forward pass.
    """

    run: str
    input: str
    out_csv: str
    overlays_dir: str | None = None
    seg_dir: str | None = None
    tta: bool | None = None
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
    data: bytes  # the stored image (JPEG frame or PNG), for full-resolution overlays
    suffix: str  # jpg | png
    file: bytes = field(repr=False)  # the DICOM file as read, for its SEG's header


@dataclass(frozen=True, kw_only=True)
class _Prediction:
    """The post-processed mask of one image at its full size, and its highest probability."""

    mask: np.ndarray  # bool [rows, cols]
    max_prob: float
    calibrated_prob: float | None = None  # max_prob under the run's temperature, if any
    uncertainty: float = 0.0  # flip disagreement (pneumo.evaluation.calibration)


def predict(cfg: PredictConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Predict every DICOM of ``cfg.input``; returns a summary.

    The summary: ``n_images`` (rows written), ``n_positive``, ``n_failed``, ``failed``
    (``[{"source", "reason"}]``), ``out_csv``, ``overlays_dir``, ``tta``, ``postprocess``,
    ``details_csv`` (:func:`details_csv`, beside ``out_csv``) and ``temperature`` (the run's,
    from ``calibration.json``, when fitted for this checkpoint step and TTA setting; else
    None); with ``seg_dir``, ``n_seg`` (SEGs written) and ``seg_failed`` (``[{"source",
    "reason"}]``: images whose CSV row was written but that a SEG cannot reference).
    ``progress`` gets ``{"done", "total"}`` after each batch.

    Raises:
        ConfigError: the input names no DICOM file.
        CheckpointError: the run has no such checkpoint.
    """
    sources = _inputs(cfg.input)
    predictor = Predictor.load(cfg.run, cfg.checkpoint, tta=cfg.tta)
    overlays = open_store(cfg.overlays_dir) if cfg.overlays_dir else None
    segs = _seg_writer(cfg, predictor)
    seg_failed: list[dict[str, str]] = []
    rows: list[tuple[str, str]] = []
    details: list[tuple[str, _Prediction]] = []  # the per-image columns of details_csv
    record = load_temperature(cfg.run, {"step": predictor.checkpoint["step"], "tta": predictor.tta})
    temperature = None if record is None else float(record["temperature"])
    failed: list[dict[str, str]] = []
    done = 0
    for chunk in _chunks(sources, cfg.batch_size):
        images = [_read(src, predictor.size, failed) for src in chunk]
        images = [im for im in images if im is not None]
        for image, pred in zip(images, _predictions(predictor, images, temperature), strict=True):
            rows.append((image.image_id, rle_encode(pred.mask)))
            details.append((image.image_id, pred))
            if overlays is not None:
                overlays.put(f"{_safe_name(image.image_id)}.png", overlay_png(image, pred))
            if segs is not None:
                _write_seg(segs, image, pred, seg_failed)
        done += len(chunk)
        if progress is not None:
            progress({"done": done, "total": len(sources)})
    write_url(cfg.out_csv, submission_csv(rows))
    write_url(details_url(cfg.out_csv), details_csv(details))
    n_positive = sum(rle != "-1" for _, rle in rows)
    log.info("%d images predicted (%d positive), %d failed", len(rows), n_positive, len(failed))
    return {
        "n_images": len(rows),
        "n_positive": n_positive,
        "n_failed": len(failed),
        "failed": failed,
        "out_csv": cfg.out_csv,
        "overlays_dir": cfg.overlays_dir,
        "seg_dir": cfg.seg_dir,
        "n_seg": 0 if segs is None else segs.written,
        "seg_failed": seg_failed,
        "tta": predictor.tta,
        "details_csv": details_url(cfg.out_csv),
        "temperature": temperature,
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
        data = read_source(src)
        dicom = read_dicom(data, src.name)
        suffix = SUFFIX_OF_FORMAT[dicom.image_format]
        pixels, _ = decode_image(dicom.image_bytes, suffix, size)
    except (BadInput, StoreError, OSError, ValueError, cv2.error) as e:
        log.warning("%s: %s", src.name, e)
        failed.append({"source": src.name, "reason": str(e)})
        return None
    if pixels.dtype == np.uint8:
        pixels = pixels.astype(np.float32) / 255.0
    return _Image(
        source=src.name,
        image_id=dicom.image_id,
        rows=dicom.rows,
        cols=dicom.cols,
        pixels=pixels,
        data=dicom.image_bytes,
        suffix=suffix,
        file=data,
    )


def _seg_writer(cfg: PredictConfig, predictor: Predictor) -> SegWriter | None:
    if cfg.seg_dir is None:
        return None
    step = int(predictor.checkpoint.get("step", 0))
    return SegWriter(cfg.seg_dir, SegAlgorithm.of(cfg.run, cfg.checkpoint, step))


def _write_seg(
    segs: SegWriter, image: _Image, pred: _Prediction, failed: list[dict[str, str]]
) -> None:
    """The image's SEG; a source that cannot have one is reported, its CSV row stays."""
    try:
        segs.write(image.file, pred.mask)
    except SegError as e:
        log.warning("%s: no SEG: %s", image.source, e)
        failed.append({"source": image.source, "reason": str(e)})


def _predictions(
    predictor: Predictor, images: list[_Image], temperature: float | None = None
) -> list[_Prediction]:
    """Post-processed bool masks at each image's original size, the highest probability
    (also under ``temperature``) and the flip uncertainty."""
    if not images:
        return []
    batch = torch.from_numpy(np.stack([im.pixels for im in images])[:, None])
    if predictor.in_channels > 1:
        batch = batch.repeat(1, predictor.in_channels, 1, 1)
    probs, uncertainty = flip_probabilities(predictor, batch)
    out = []
    for image, prob, spread in zip(images, probs, uncertainty, strict=True):
        full = upsample(prob, (image.rows, image.cols))
        mask = predictor.post.apply(full).cpu().numpy()
        max_prob = float(full.max())
        # The calibrated map sigmoid(logit(p) / T) is monotone in p: its largest pixel is
        # the largest pixel's, and the triplet's masks (searched on p) are the same.
        calibrated = (
            None if temperature is None else float(scale_probability(max_prob, temperature))
        )
        out.append(_Prediction(mask=mask, max_prob=max_prob, calibrated_prob=calibrated,
                               uncertainty=float(spread)))  # fmt: skip
    return out


def details_url(out_csv: str) -> str:
    """Where the per-image details go: beside the submission, ``sub.csv`` -> ``sub.details.csv``."""
    stem = out_csv[: -len(".csv")] if out_csv.lower().endswith(".csv") else out_csv
    return f"{stem}.details.csv"


def details_csv(details: list[tuple[str, _Prediction]]) -> bytes:
    """``ImageId,probability,calibrated_probability,uncertainty``: the image-level probability
    (largest pixel probability at full size, before the triplet), the same under the run's
    temperature (empty without one), and the flip uncertainty. The submission CSV stays
    ``ImageId,EncodedPixels``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ImageId", "probability", "calibrated_probability", "uncertainty"])
    for image_id, pred in details:
        calibrated = "" if pred.calibrated_prob is None else f"{pred.calibrated_prob:.6f}"
        writer.writerow([image_id, f"{pred.max_prob:.6f}", calibrated, f"{pred.uncertainty:.6f}"])
    return out.getvalue().encode()


def submission_csv(rows: list[tuple[str, str]]) -> bytes:
    """``ImageId,EncodedPixels`` CSV bytes (LF line ends, as the SIIM sample submissions)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ImageId", "EncodedPixels"])
    writer.writerows(rows)
    return out.getvalue().encode()


def overlay_png(image: _Image, pred: _Prediction) -> bytes:
    """The image at its full resolution, the mask blended in colour, and a caption (image
    id, highest probability, the call) in the top-left corner, as PNG."""
    grey = _full_resolution(image)
    if grey.dtype == np.uint8:
        grey = grey.astype(np.float32) / 255.0
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=2)
    rgb[pred.mask] = (1 - OVERLAY_ALPHA) * rgb[pred.mask] + OVERLAY_ALPHA * OVERLAY_COLOUR
    bgr = cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2BGR)
    _caption(bgr, overlay_caption(image.image_id, pred.max_prob, bool(pred.mask.any())))
    ok, data = cv2.imencode(".png", bgr)
    if not ok:
        raise ValueError("cannot encode the overlay PNG")
    return data.tobytes()


def overlay_caption(image_id: str, max_prob: float, positive: bool) -> list[str]:
    """The lines written on an overlay: the image id, its highest probability, the call."""
    call = "pneumothorax" if positive else "no pneumothorax"
    return [image_id, f"max p {max_prob:.3f}: {call}"]


def _full_resolution(image: _Image) -> np.ndarray:
    """The stored image decoded at its own rows x cols (the loader's decoder, no downscale)."""
    side = max(image.rows, image.cols)
    pixels, _ = decode_image(image.data, image.suffix, side)
    if pixels.shape != (image.rows, image.cols):  # decode_image squares: undo it
        pixels = cv2.resize(pixels, (image.cols, image.rows), interpolation=cv2.INTER_AREA)
    return pixels


def _caption(bgr: np.ndarray, lines: list[str]) -> None:
    """White text on a dark band, sized to the image (about 1/40 of its height per line)."""
    rows, cols = bgr.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    (width, height), _ = cv2.getTextSize(max(lines, key=len), font, 1.0, 1)
    scale = max(0.3, min(rows / 40 / height, (cols - 8) / width))
    thickness = max(1, round(scale * 1.5))
    line_h = int(height * scale * 1.6) + 2
    band = bgr[: line_h * len(lines) + 4]
    band[:] = (band * 0.35).astype(np.uint8)  # darken, keep the image faintly visible
    for i, line in enumerate(lines):
        origin = (4, line_h * (i + 1) - 2)
        cv2.putText(bgr, line, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def _safe_name(image_id: str) -> str:
    """A file name for an image id (UIDs are dotted: dots are fine in a file name)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in image_id) or "image"
