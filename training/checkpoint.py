"""Self-describing checkpoints, stored in a RUN (any store), like nanoGPT's checkpoint dict.

A checkpoint is one ``torch.save``d dict; everything needed to rebuild the model, resume
training or trace what it was trained on is inside::

    format                "pneumo.checkpoint/1"
    task                  "segment" | "classify" | ...
    model_args            the architecture, e.g. {"arch": "unet", "encoder": "resnet34",
                          "in_channels": 1}; pneumo.training.model.build_model rebuilds it
    model                 the model's state dict (never DDP-wrapped: no "module." prefix)
    init                  the init chain: where the weights started, newest first, e.g.
                          [{"source": ".../checkpoints/best.pt", "sha256": ..., "task":
                          "classify", ...}, {"source": "random", "seed": 0}] (see init_line)
    step                  optimizer steps done (global, all epochs)
    epoch                 the epoch the next step belongs to (= step // steps_per_epoch)
    steps_per_epoch, total_steps, world_size
    config                the full training config, as a JSON-able dict
    fingerprints          {"train", "val"[, "labels"]}: pneumo.shards.manifest.fingerprint of the
                          pinned rows (and of a label table)
    train_rows, val_rows  how many rows each pinned selection has
    leakage               the held-out patient check at the run's start (pneumo.training.loop)
    best_metric           the metrics.jsonl field that picks best.pt, and best_score its value
    val                   the validation metrics of the epoch that wrote it ({} mid-epoch)
    versions              {"torch", "smp"}
    optimizer, scheduler  their state dicts             } last.pt only: best.pt is for
    rng                   {"torch", "cuda", "numpy",    } inference, a third of the size
                           "python"} generator states   }

Only tensors and plain Python values are stored, so ``torch.load(..., weights_only=True)``
reads it: loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch import nn

from pneumo.shards.errors import PneumoError
from pneumo.shards.store import open_store, read_url
from pneumo.training.model import build_model

log = logging.getLogger(__name__)

FORMAT = "pneumo.checkpoint/1"
LAST = "checkpoints/last.pt"
BEST = "checkpoints/best.pt"
_NAMED = {"last": LAST, "best": BEST}


class CheckpointError(PneumoError):
    """A checkpoint is missing, unreadable or not one of ours."""


def to_bytes(ckpt: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def load_checkpoint(run: str, which: str = "best") -> dict[str, Any]:
    """Load ``which`` checkpoint of a RUN onto the CPU.

    Args:
        run: the RUN url (folder or ``s3://``).
        which: ``"best"``, ``"last"``, or the URL of a ``.pt`` file anywhere.

    Raises:
        CheckpointError: it does not exist or is not a pneumo checkpoint.
    """
    try:
        if which in _NAMED:
            store = open_store(run, create=False)
            if not store.exists(_NAMED[which]):
                raise CheckpointError(
                    f"{store.url_of(_NAMED[which])} does not exist: has `pneumo train ... "
                    f"--out {run}` finished an epoch?"
                )
            blob, name = store.get(_NAMED[which]), store.url_of(_NAMED[which])
        else:
            blob, name = read_url(which), which
        ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except PneumoError:
        raise
    except Exception as e:  # zip / unpickling errors of many types
        raise CheckpointError(f"cannot read checkpoint {which} of {run}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not a pneumo checkpoint (no format {FORMAT!r})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], *, arch: str | None = None) -> nn.Module:
    """Rebuild the network a checkpoint describes, with its weights, in eval mode.

    Raises:
        CheckpointError: ``arch`` is given and the checkpoint holds another architecture.
    """
    args = ckpt["model_args"]
    if arch is not None and args.get("arch") != arch:
        raise CheckpointError(
            f"the checkpoint holds a {args.get('arch')!r} ({ckpt.get('task')} run), not a {arch}"
        )
    model = build_model(args)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's tensors: names, dtypes, shapes and bytes, in name order.

    The hash names the weights, not the file: the same tensors saved twice, or inside
    checkpoints with other metadata, hash the same.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def random_init(seed: int) -> dict[str, Any]:
    """The last link of every init chain: weights drawn at random from ``seed``."""
    return {"source": "random", "seed": seed}


def init_line(chain: list[dict[str, Any]]) -> str:
    """An init chain in one line, newest first: ``classify checkpoint X (sha256 ab12..) <-
    random init (seed 0)``."""
    parts = []
    for link in chain:
        if link.get("source") == "random":
            parts.append(f"random init (seed {link.get('seed')})")
            continue
        what = f"{link['task']} checkpoint" if link.get("task") else "state dict"
        step = f", step {link['step']}" if link.get("step") is not None else ""
        parts.append(f"{what} {link['source']} (sha256 {str(link.get('sha256'))[:16]}{step})")
    return " <- ".join(parts) if parts else "unknown"


def versions() -> dict[str, str]:
    return {"torch": str(torch.__version__), "smp": str(smp.__version__)}


def rng_state() -> dict[str, Any]:
    """The global generators' states, in weights_only-loadable types."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (CUDA states only when devices match)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
