"""A tiny demo dataset (SIIM images drawn from NIH images, one dataset split by patient)
and a tiny recipe: seconds per stage on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumo.experiment.demo import DemoData, DemoDataConfig, make_demo_dataset

TINY_RECIPE = """
[experiment]
name = "tiny"
seeds = 2
arms = ["none"]
bootstrap_resamples = 300

[segment]
size = 64
batch_size = 4
lr = 1e-3
warmup_steps = 1
epochs = 2
steps_per_epoch = 3
workers = 0
encoder = "resnet18"
checkpoint_every = 1

[classify]
size = 64
batch_size = 4
epochs = 1
steps_per_epoch = 3
workers = 0

[pseudo_classify]
size = 64
batch_size = 4
epochs = 1
steps_per_epoch = 3
workers = 0

[autoencode]
size = 64
latent_dim = 8
batch_size = 4
epochs = 1
steps_per_epoch = 3
kl_anneal_steps = 2
workers = 0

[embed]
batch_size = 16
workers = 0

[cluster]
pca = 4
clusters = 3
method = "kmeans"

[evaluate]
batch_size = 16
workers = 0
"""


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, DemoData]:
    root = tmp_path_factory.mktemp("experiment-data")
    cfg = DemoDataConfig(
        raw=root / "raw", dataset=str(root / "dataset"), n_nih=120, n_siim=60, size=64
    )
    return cfg.dataset, make_demo_dataset(cfg)


@pytest.fixture(scope="session")
def tiny_recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path
