"""``embed`` runs the encoder in fp32 unless asked otherwise; ``--precision bf16`` (or
fp16) really autocasts, on the CPU too, and ``_embed.json`` says which the codes are.

fp32 is the default because the pseudo-labels are clustered from these codes and a bf16
code moves by ~0.5% of its scale, enough to carry images across a DBSCAN radius
(benchmarks/bench_embed_precision.py measures it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from test_embed import write_run

from pneumo.pseudolabels.embed import EmbedConfig, embed
from pneumo.shards.errors import ConfigError
from pneumo.training.autoencoders import Autoencoder


def codes(out: str) -> np.ndarray:
    table = ds.dataset(out, format="parquet").to_table().sort_by("key")
    return np.stack(table["embedding"].to_numpy(zero_copy_only=False))


@pytest.fixture
def dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtype of every batch of codes the encoder returns (before embed makes them fp32)."""
    seen: list[torch.dtype] = []
    real = Autoencoder.embed

    def recording(self: Autoencoder, x: torch.Tensor) -> torch.Tensor:
        out = real(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(Autoencoder, "embed", recording)
    return seen


def test_fp32_is_the_default_and_repeats_exactly(tmp_path: Path, dataset, dtypes) -> None:
    run, _ = write_run(tmp_path / "run", "vae")
    first = EmbedConfig(run=run, dataset=dataset.url, out=str(tmp_path / "a"), workers=0)
    assert first.precision == "fp32"
    embed(first)
    embed(EmbedConfig(run=run, dataset=dataset.url, out=str(tmp_path / "b"), workers=0))
    assert set(dtypes) == {torch.float32}
    np.testing.assert_array_equal(codes(str(tmp_path / "a")), codes(str(tmp_path / "b")))
    meta = json.loads((tmp_path / "a" / "_embed.json").read_text())
    assert meta["precision"] == "fp32" and meta["config"]["precision"] == "fp32"


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_a_lower_precision_moves_the_codes_a_little(
    tmp_path: Path, dataset, dtypes, precision: str, dtype: torch.dtype
) -> None:
    run, _ = write_run(tmp_path / "run", "vae")
    embed(EmbedConfig(run=run, dataset=dataset.url, out=str(tmp_path / "fp32"), workers=0))
    out = str(tmp_path / precision)
    result = embed(
        EmbedConfig(run=run, dataset=dataset.url, out=out, workers=0, precision=precision)
    )
    assert result["precision"] == precision
    assert json.loads((tmp_path / precision / "_embed.json").read_text())["precision"] == precision
    assert dtypes[-1] == dtype  # the encoder ran under autocast, on the CPU
    exact, low = codes(str(tmp_path / "fp32")), codes(out)
    assert low.dtype == np.float32  # stored as float32 whatever it was computed in
    diff = np.abs(low - exact).max()
    # bf16 keeps 8 significant bits, fp16 11: off by a little, never equal, never far.
    assert 0 < diff < 0.05 * np.abs(exact).max(), diff


def test_an_unknown_precision_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--precision 'int8': expected one of fp32, bf16, fp16"):
        EmbedConfig(run="r", dataset="d", out=str(tmp_path), precision="int8")


@pytest.mark.slow
def test_the_command_embeds_in_fp32_unless_told(tmp_path: Path, dataset, pneumo) -> None:
    run, _ = write_run(tmp_path / "run", "ae")
    plain, low = tmp_path / "plain", tmp_path / "bf16"
    pneumo("embed", run, dataset.url, "--out", str(plain), "--workers", "0")
    pneumo("embed", run, dataset.url, "--out", str(low), "--workers", "0", "--precision", "bf16")
    assert json.loads((plain / "_embed.json").read_text())["precision"] == "fp32"
    assert json.loads((low / "_embed.json").read_text())["precision"] == "bf16"
    assert not np.array_equal(codes(str(plain)), codes(str(low)))
    refused = pneumo("embed", run, dataset.url, "--out", str(tmp_path / "x"), "--precision",
                     "fp8", check=False)  # fmt: skip
    assert refused.returncode == 1 and "--precision 'fp8'" in refused.stderr
