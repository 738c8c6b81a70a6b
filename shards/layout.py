"""Where everything lives inside a dataset, and how samples are named.

::

    DATASET/
      _pneumo.json                                  schema version, split policy (created once)
      shards/<dataset>/<batch>/<dataset>-<batch>-<attempt>-<split>-<label>-000000.tar
      manifest/                 Delta table, one row per image (partitioned by dataset)
      quarantine/               Delta table, one row per rejected input
      batches/<dataset>-<batch>.json                what a batch was made from (and counts)
      batches/<dataset>-<batch>/lease-000000.json   the attempt writing the batch, alive or not
      batches/<dataset>-<batch>/chunk-000000.json.gz  progress of a batch being written
      batches/<dataset>-<batch>.dropping            a drop under way

Every attempt at a batch names its shards with its own attempt id, so no attempt ever
overwrites or deletes another's files; the shards an attempt wrote but never committed (it
was killed, or lost its lease) are removed only by ``pneumo vacuum``.

Shards are grouped by split and label (``pos``, ``neg``, ``unl`` for unlabelled) so a
training stream reads only the shards of its split and can draw positives and negatives at
a controlled rate without scanning everything.

A sample inside a tar is a group of members sharing a key: one image, ``KEY.jpg`` (a
JPEG frame as it was), ``KEY.png`` (8-bit) or ``KEY.npy.gz`` (16-bit, which webdataset's
image decoders would clip), then ``KEY.mask.png`` (labelled SIIM images) and ``KEY.json``.
webdataset splits a member name at its *first* dot, so keys never contain one; keys are
also short and plain whatever the image id is (see :func:`sample_key`).
"""

from __future__ import annotations

import hashlib
import re

from pneumo.shards.errors import ConfigError

SCHEMA_VERSION = 2  # 2: the manifest has each sample's byte offset and size in its shard
SETTINGS_FILE = "_pneumo.json"
MANIFEST_DIR = "manifest"
QUARANTINE_DIR = "quarantine"
SHARDS_DIR = "shards"

# The mask member's suffix, as webdataset sees it (everything after the key's first dot).
MASK_SUFFIX = "mask.png"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Ids kept readable in keys. Plain ids are keys as they are; dotted ids (DICOM UIDs) have
# no underscore, so two UIDs never share a key (a UID whose key equals some plain id is
# caught, and quarantined, when the batch is written).
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_DOTTED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
# DICOM UIDs are at most 64 characters; with ".mask.png" a member name stays far below
# the 100 bytes of a plain tar header.
MAX_KEY_CHARS = 64
HASHED_KEY_PREFIX = "h_"


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
    """A short, dot-free, safe key, stable for an image id.

    ``00000001_000`` and ``ID_0011fe81e`` stay as they are, a DICOM UID has its dots
    replaced (``1.2.276.0.72...`` -> ``1_2_276_0_72...``); any other id (too long, spaces,
    ``../``, non-ASCII, empty) gets ``h_`` and 32 hex digits of its SHA-256. The id itself
    is kept in the manifest's ``image_id``.
    """
    if len(image_id) <= MAX_KEY_CHARS:
        if _PLAIN_ID.fullmatch(image_id):
            return image_id
        if _DOTTED_ID.fullmatch(image_id):
            return image_id.replace(".", "_")
    digest = hashlib.sha256(image_id.encode("utf-8", "surrogatepass")).hexdigest()
    return HASHED_KEY_PREFIX + digest[:32]


def label_group(has_ptx: bool | None) -> str:
    return "unl" if has_ptx is None else ("pos" if has_ptx else "neg")


def shard_path(
    dataset: str, batch: str, split: str, group: str, index: int, attempt: str = ""
) -> str:
    """A shard's path; ``attempt`` (the id of the ingest attempt writing it) keeps every
    attempt's files apart."""
    tag = f"{attempt}-" if attempt else ""
    return f"{SHARDS_DIR}/{dataset}/{batch}/{dataset}-{batch}-{tag}{split}-{group}-{index:06d}.tar"


def batch_shard_prefix(dataset: str, batch: str) -> str:
    return f"{SHARDS_DIR}/{dataset}/{batch}/"


def manifest_part(dataset: str, batch: str) -> str:
    """A batch's Parquet part in a dataset written before the table format."""
    return f"{MANIFEST_DIR}/dataset={dataset}/batch={batch}/part-0.parquet"


BATCHES_DIR = "batches"


def batch_record(dataset: str, batch: str) -> str:
    return f"{BATCHES_DIR}/{dataset}-{batch}.json"


def batch_progress_prefix(dataset: str, batch: str) -> str:
    """Where a batch being written records its finished chunks (gone once committed)."""
    return f"{BATCHES_DIR}/{dataset}-{batch}/"


def chunk_record(dataset: str, batch: str, index: int) -> str:
    return f"{batch_progress_prefix(dataset, batch)}chunk-{index:06d}.json.gz"


def lease_path(dataset: str, batch: str, generation: int) -> str:
    """The lease of the attempt writing a batch: the highest generation holds it."""
    return f"{batch_progress_prefix(dataset, batch)}lease-{generation:06d}.json"


def recorded_batches(paths: list[str]) -> set[tuple[str, str]]:
    """(dataset, batch) of the batch records among ``paths`` (a listing of ``batches/``)."""
    out = set()
    for path in paths:
        name = path[len(BATCHES_DIR) + 1 :]
        if "/" in name or not name.endswith(".json"):
            continue
        dataset, sep, batch = name.removesuffix(".json").partition("-")
        if sep and dataset and batch:
            out.add((dataset, batch))
    return out


def drop_marker(dataset: str, batch: str) -> str:
    """Written first by ``pneumo batch drop``, deleted last: a drop under way."""
    return f"{BATCHES_DIR}/{dataset}-{batch}.dropping"


def manifest_part_prefix(dataset: str, batch: str) -> str:
    return f"{MANIFEST_DIR}/dataset={dataset}/batch={batch}/"


def quarantine_part_prefix(dataset: str, batch: str) -> str:
    return f"{QUARANTINE_DIR}/dataset={dataset}/batch={batch}/"


def quarantine_part(dataset: str, batch: str) -> str:
    return f"{QUARANTINE_DIR}/dataset={dataset}/batch={batch}/part-0.parquet"
