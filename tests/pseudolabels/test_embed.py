"""``embed``: one row per selected key, the right vector for each key, local and on S3."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from pneumo.pseudolabels.embed import EmbedConfig, embed
from pneumo.pseudolabels.parquet import open_parquet
from pneumo.shards import manifest
from pneumo.training import checkpoint as ckpts
from pneumo.training.autoencoders import Autoencoder, model_args
from pneumo.training.data import select
from pneumo.training.decode import decode_image

SIZE, DIM = 64, 16


def write_run(root: Path, kind: str, seed: int = 0) -> tuple[str, Autoencoder]:
    """A RUN holding an untrained autoencoder's best.pt, as the training task writes it."""
    torch.manual_seed(seed)
    model = Autoencoder(kind=kind, size=SIZE, latent_dim=DIM).eval()
    ckpt = {
        "format": ckpts.FORMAT,
        "task": "autoencode",
        "model_args": model_args(kind, SIZE, DIM),
        "model": model.state_dict(),
    }
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "best.pt").write_bytes(ckpts.to_bytes(ckpt))
    return str(root), model


def expected_embedding(model: Autoencoder, members: dict[str, bytes]) -> np.ndarray:
    suffix = "jpg" if "jpg" in members else "png"
    image, _ = decode_image(members[suffix], suffix, SIZE)
    pixels = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
    with torch.no_grad():
        return model.embed(torch.from_numpy(pixels)[None, None]).numpy()[0]


def rows_of(url: str) -> dict[str, dict]:
    table = open_parquet(url).to_table()
    return {r["key"]: r for r in table.to_pylist()}


@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_gets_its_own_mean_embedding(tmp_path: Path, dataset, workers: int) -> None:
    run, model = write_run(tmp_path / "run", "vae")
    out = str(tmp_path / "emb")
    result = embed(
        EmbedConfig(run=run, dataset=dataset.url, out=out, batch_size=6, workers=workers)
    )

    rows = rows_of(out)
    assert set(rows) == {r["key"] for r in dataset.rows}  # unlabelled rows included
    assert result["rows"] == len(rows) == 40 and result["dim"] == DIM
    schema = ds.dataset(out, format="parquet").schema  # plain pyarrow opens it
    assert schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    for key in ("s000", "s001", "s003", "s007"):  # JPEG, PNG, 16-bit PNG, unlabelled
        got = np.asarray(rows[key]["embedding"], np.float32)
        np.testing.assert_allclose(got, expected_embedding(model, dataset.members[key]), atol=1e-4)
        assert rows[key]["split"] == dataset.row(key)["split"]
        assert rows[key]["image_id"] == dataset.row(key)["image_id"]


def test_where_selects_and_stale_parts_go(tmp_path: Path, dataset) -> None:
    run, _ = write_run(tmp_path / "run", "ae")
    out = tmp_path / "emb"
    out.mkdir()
    (out / "part-00001-of-00002.parquet").write_bytes(b"an earlier run's part")
    result = embed(
        EmbedConfig(run=run, dataset=dataset.url, out=str(out), where="split == 'val'", workers=0)
    )
    assert set(rows_of(str(out))) == dataset.keys("val", labelled_only=False)
    assert sorted(p.name for p in out.iterdir()) == ["_embed.json", "part-00000-of-00001.parquet"]
    assert result["embedding"] == "code" and result["kind"] == "ae"


def test_on_s3_with_its_provenance(tmp_path: Path, s3_dataset, s3_bucket: str) -> None:
    run, model = write_run(tmp_path / "run", "vae", seed=1)
    out = f"{s3_bucket}/emb"
    embed(EmbedConfig(run=run, dataset=s3_dataset.url, out=out, batch_size=8, workers=0))

    rows = rows_of(out)
    assert set(rows) == {r["key"] for r in s3_dataset.rows}
    assert all(len(r["embedding"]) == DIM for r in rows.values())
    np.testing.assert_allclose(
        rows["s002"]["embedding"], expected_embedding(model, s3_dataset.members["s002"]), atol=1e-4
    )
    body = boto3.client("s3").get_object(Bucket=s3_bucket[5:], Key="emb/_embed.json")["Body"]
    meta = json.loads(body.read())
    best = (Path(run) / "checkpoints" / "best.pt").read_bytes()
    assert meta["checkpoint_sha256"] == hashlib.sha256(best).hexdigest()
    assert meta["checkpoint"].endswith("checkpoints/best.pt")
    assert meta["manifest_fingerprint"] == manifest.fingerprint(select(s3_dataset.url, None))
    assert meta["dataset"] == s3_dataset.url and meta["rows"] == 40


def test_a_segmentation_checkpoint_is_refused(tmp_path: Path, dataset) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt = {"format": ckpts.FORMAT, "task": "segment", "model_args": {"arch": "unet"}, "model": {}}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    (tmp_path / "run" / "checkpoints" / "best.pt").write_bytes(buf.getvalue())
    with pytest.raises(ckpts.CheckpointError, match="not an autoencoder"):
        embed(EmbedConfig(run=str(tmp_path / "run"), dataset=dataset.url, out=str(tmp_path / "e")))
    with pytest.raises(ckpts.CheckpointError, match="no autoencoder checkpoint"):
        embed(EmbedConfig(run=str(tmp_path), dataset=dataset.url, out=str(tmp_path / "e")))


@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_ranks_write_one_part_each(tmp_path: Path, dataset, free_port: int) -> None:
    run, _ = write_run(tmp_path / "run", "vae")
    bin_dir = Path(sys.executable).parent
    script = shutil.which("pneumo", path=str(bin_dir))
    assert script, "the pneumo console script is installed next to the interpreter"
    out = tmp_path / "emb"
    proc = subprocess.run(
        [
            str(bin_dir / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port),
            script, "embed", run, dataset.url, "--out", str(out), "--workers", "0",
            "--batch-size", "4",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    parts = sorted(p.name for p in out.glob("*.parquet"))
    assert parts == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    per_part = [pq.read_table(out / p).column("key").to_pylist() for p in parts]
    assert all(per_part) and not set(per_part[0]) & set(per_part[1])
    assert set(per_part[0]) | set(per_part[1]) == {r["key"] for r in dataset.rows}
    assert json.loads((out / "_embed.json").read_text())["rows"] == 40
