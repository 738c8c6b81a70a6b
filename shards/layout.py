"""Where everything lives inside a dataset, and how samples are named.

::

    DATASET/
      _pneumo.json                                        dataset settings (schema, split fractions)
      shards/<dataset>/<batch>/<dataset>-<batch>-<split>-<label>-000000.tar
      manifest/dataset=<dataset>/batch=<batch>/part-0.parquet     one row per sample
      quarantine/dataset=<dataset>/batch=<batch>/part-0.parquet   one row per rejected input
      batches/<dataset>-<batch>.json                      what a committed batch was made from

Shards are grouped by split and label (``pos``, ``neg``, ``unl`` for unlabelled) so a
training stream reads only the shards of its split and can draw positives and negatives at
a controlled rate without scanning everything.

A sample inside a tar is a group of members sharing a key: ``KEY.jpg`` or ``KEY.png``
(the image), ``KEY.mask.png`` (labelled SIIM images), ``KEY.json`` (metadata).
webdataset splits a member name at its *first* dot, so keys never contain one.
"""

from __future__ import annotations

import re

from shards.errors import ConfigError

SCHEMA_VERSION = 2  # 2: the manifest has each sample's byte offset and size in its shard
SETTINGS_FILE = "_pneumo.json"
MANIFEST_DIR = "manifest"
QUARANTINE_DIR = "quarantine"
SHARDS_DIR = "shards"

# The mask member's suffix, as webdataset sees it (everything after the key's first dot).
MASK_SUFFIX = "mask.png"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def check_name(kind: str, name: str) -> str:
    """Dataset and batch names end up in paths and hive partitions: keep them plain.

    Raises:
        ConfigError: the name has characters other than letters, digits, ``_`` and ``-``.
    """
    if not _NAME.match(name):
        raise ConfigError(
            f"{kind} name {name!r} must be 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def sample_key(image_id: str) -> str:
    """A dot-free key, stable for an image id: ``1.2.276.0.72...`` -> ``1_2_276_0_72...``."""
    key = _KEY_UNSAFE.sub("_", image_id.strip())
    if not key:
        raise ConfigError(f"image id {image_id!r} gives an empty key")
    return key


def label_group(has_ptx: bool | None) -> str:
    return "unl" if has_ptx is None else ("pos" if has_ptx else "neg")


def shard_path(dataset: str, batch: str, split: str, group: str, index: int) -> str:
    return f"{SHARDS_DIR}/{dataset}/{batch}/{dataset}-{batch}-{split}-{group}-{index:06d}.tar"


def batch_shard_prefix(dataset: str, batch: str) -> str:
    return f"{SHARDS_DIR}/{dataset}/{batch}/"


def manifest_part(dataset: str, batch: str) -> str:
    return f"{MANIFEST_DIR}/dataset={dataset}/batch={batch}/part-0.parquet"


def batch_record(dataset: str, batch: str) -> str:
    return f"batches/{dataset}-{batch}.json"


def quarantine_part(dataset: str, batch: str) -> str:
    return f"{QUARANTINE_DIR}/dataset={dataset}/batch={batch}/part-0.parquet"
