"""``pneumo embed``: an autoencoder's codes for a dataset's images, as a Parquet dataset.

The flow of :func:`embed`:

1. join the torchrun process group, if any; load the autoencoder checkpoint (its SHA-256 is
   recorded) and rebuild the network it describes, in eval mode;
2. select the rows (``where``; default every row, unlabelled ones included) and stream them
   the way evaluation does: every selected sample exactly once over all ranks and loader
   workers, unaugmented, at the autoencoder's input size;
3. embed each batch (the VAE's ``mu``, never a sample) in ``precision``: fp32 by default,
   the precision the clustering's tests and radii were checked in; ``bf16`` / ``fp16``
   autocast on request (on the CPU too), faster on a GPU but not the same codes: bf16
   moved codes by up to 0.5% of their scale in ``benchmarks/bench_embed_precision.py``
   (CPU, two seeds), which changed 0.3% and 2.5% of the DBSCAN labels, and up to 23% when
   the radius found for the fp32 codes was reused;
4. each rank writes its own part, ``EMBEDDINGS/part-<rank>-of-<world>.parquet``, rows
   sorted by key: ``key``, ``image_id``, ``dataset``, ``split``, ``patient_key``,
   ``embedding`` (fixed-size list of float32); parts of an earlier run with another world
   size are removed;
5. rank 0 writes ``EMBEDDINGS/_embed.json``: the checkpoint and its hash, the dataset, the
   selection and its manifest fingerprint, the row count and dimension, and the
   ``precision`` the codes were computed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pneumo.pseudolabels.parquet import write_json
from pneumo.shards import manifest, stream
from pneumo.shards.errors import ConfigError, PneumoError
from pneumo.shards.store import open_store, read_url
from pneumo.training import checkpoint as ckpts
from pneumo.training.autoencoders import Autoencoder, build_autoencoder
from pneumo.training.data import LoaderConfig, eval_batches, select
from pneumo.training.runs import DistEnv, gather, images_to, setup_device, teardown

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
META_FILE = "_embed.json"
COLUMNS = ("key", "image_id", "dataset", "split", "patient_key")
# The dtype the encoder runs in under autocast (None: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """What an embedding run depends on; stored in ``_embed.json``.

    Attributes:
        run: the autoencoder RUN (folder or s3://).
        dataset: the DATASET whose images are embedded.
        out: EMBEDDINGS folder or s3:// prefix.
        where: manifest filter of the rows to embed; None: every row.
        batch_size: images per forward pass.
        workers: loader processes per rank.
        checkpoint: ``best``, ``last``, or the URL of a checkpoint file.
        precision: ``fp32`` (default), ``bf16`` or ``fp16``: the autocast dtype of the
            encoder, on any device (see the module doc for why fp32 is the default).
    """

    run: str
    dataset: str
    out: str
    where: str | None = None
    batch_size: int = 64
    workers: int = 2
    checkpoint: str = "best"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}"
            )


def embed(cfg: EmbedConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Embed the selected images (see the module doc); every torchrun rank calls this.

    ``progress`` (rank 0) gets ``{"done", "total"}`` images, ``done`` estimated as rank 0's
    count times the world size.

    Returns:
        What ``_embed.json`` holds, with ``out``.

    Raises:
        CheckpointError: the checkpoint is missing or not an autoencoder's.
        ConfigError: the selection is empty.
    """
    env = DistEnv.from_env()
    device = setup_device(env)
    try:
        ckpt, ckpt_url, ckpt_sha = load_autoencoder(cfg.run, cfg.checkpoint)
        model = build_autoencoder(ckpt["model_args"])
        model.load_state_dict(ckpt["model"])
        model.to(device).eval()
        rows = select(cfg.dataset, cfg.where)
        if rows.num_rows == 0:
            raise ConfigError(f"--where {cfg.where!r} selects no rows in {cfg.dataset}")
        keys, vectors = _embed_rank(cfg, env, device, model, rows, progress)
        out = open_store(cfg.out)
        table = _part_table(rows, keys, vectors, model.latent_dim)
        manifest.write_part(out, _part_name(env.rank, env.world_size), table)
        counts = gather(env, len(keys))  # also waits for every rank's part
        meta = {
            "checkpoint": ckpt_url,
            "checkpoint_sha256": ckpt_sha,
            "task": ckpt.get("task"),
            "kind": model.kind,
            "embedding": "mu" if model.kind == "vae" else "code",
            "dim": model.latent_dim,
            "size": model.size,
            "precision": cfg.precision,
            "dataset": open_store(cfg.dataset, create=False).url,
            "where": cfg.where,
            "manifest_fingerprint": manifest.fingerprint(rows),
            "selected_rows": rows.num_rows,
            "rows": int(sum(counts)),
            "parts": [_part_name(r, env.world_size) for r in range(env.world_size)],
            "config": asdict(cfg),
        }
        if env.is_main:
            _remove_stale_parts(out, meta["parts"])
            write_json(out, META_FILE, meta)
        if meta["rows"] < rows.num_rows:
            log.warning(
                "%d of the %d selected images were not found in their shards",
                rows.num_rows - meta["rows"], rows.num_rows,
            )  # fmt: skip
        return {**meta, "out": out.url}
    finally:
        teardown(env)


def load_autoencoder(run: str, which: str) -> tuple[dict[str, Any], str, str]:
    """An autoencoder checkpoint of ``run`` (``best``/``last``) or at a URL, its URL and the
    SHA-256 of its bytes.

    Raises:
        CheckpointError: it cannot be read, or is not an autoencoder's checkpoint.
    """
    if which in ("best", "last"):
        url = open_store(run, create=False).url_of(ckpts.BEST if which == "best" else ckpts.LAST)
    else:
        url = which
    try:
        blob = read_url(url)
        ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except PneumoError as e:
        raise ckpts.CheckpointError(f"no autoencoder checkpoint: {e}") from e
    except Exception as e:  # zip / unpickling errors of many types
        raise ckpts.CheckpointError(f"cannot read checkpoint {url}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != ckpts.FORMAT:
        raise ckpts.CheckpointError(f"{url} is not a pneumo checkpoint")
    arch = ckpt.get("model_args", {}).get("arch")
    if arch != "autoencoder":
        raise ckpts.CheckpointError(
            f"{url} holds a {arch!r} ({ckpt.get('task')} task), not an autoencoder: "
            "embed needs a `pneumo train autoencode` run"
        )
    return ckpt, url, hashlib.sha256(blob).hexdigest()


def _embed_rank(
    cfg: EmbedConfig,
    env: DistEnv,
    device: torch.device,
    model: Autoencoder,
    rows: pa.Table,
    progress: Progress | None,
) -> tuple[list[str], np.ndarray]:
    """This rank's keys and embeddings."""
    loader = LoaderConfig(
        dataset=cfg.dataset,
        size=model.size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        augment=False,
    )
    entries = stream.entries_from_table(rows.select(stream.ENTRY_COLUMNS))
    batches = eval_batches(loader, rank=env.rank, world_size=env.world_size, entries=entries)
    keys: list[str] = []
    parts: list[np.ndarray] = []
    with torch.no_grad():
        for batch in batches:
            with precision_context(device, cfg.precision):
                codes = model.embed(images_to(device, batch["image"]))
            parts.append(codes.float().cpu().numpy())
            keys.extend(batch["key"])
            if progress is not None and env.is_main:
                done = min(len(keys) * env.world_size, len(entries))
                progress({"done": done, "total": len(entries)})
    vectors = np.concatenate(parts) if parts else np.zeros((0, model.latent_dim), np.float32)
    return keys, vectors


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision``'s dtype on ``device`` (the CPU included: asked for, it is
    honoured, unlike training's GPU-only autocast); nothing for ``fp32``."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _part_table(rows: pa.Table, keys: list[str], vectors: np.ndarray, dim: int) -> pa.Table:
    """The part's rows, sorted by key, with the manifest's columns for each key."""
    info = {r["key"]: r for r in rows.select(list(COLUMNS)).to_pylist()}
    order = sorted(range(len(keys)), key=keys.__getitem__)
    columns = {
        name: pa.array([info[keys[i]][name] for i in order], pa.string()) for name in COLUMNS
    }
    flat = pa.array(vectors[order].astype(np.float32).ravel(), pa.float32())
    return pa.table({**columns, "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})


def _part_name(rank: int, world_size: int) -> str:
    return f"part-{rank:05d}-of-{world_size:05d}.parquet"


def _remove_stale_parts(store: Any, parts: list[str]) -> None:
    for path in store.list():
        if path.endswith(".parquet") and "/" not in path and path not in parts:
            log.info("removing %s of an earlier embedding run", store.url_of(path))
            store.delete(path)
