"""Which batch a run makes: its identity, its split policy, and whether it is done.

A batch's identity covers everything that changes its rows: the source files, the label,
xref and list files, the split policy, the DICOM patient rule and relabelling. It names the
batch by default, so running the same command again finds the same batch (to resume it, or
to say it is already committed), and running it with another xref, list or patient rule
makes another batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo.ingest import chunks
from pneumo.ingest.batch import BatchConfig, BatchRun, BatchSummary
from pneumo.ingest.patients import (
    DEFAULT_FRACTIONS,
    Patient,
    SplitPolicy,
    batch_policy,
    resolve_secret,
)
from pneumo.shards import layout, manifest
from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.lease import Lease
from pneumo.shards.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SplitLists:
    """What a batch's split lists say, before hashing: patients whose images are listed
    for test, and whether official lists (which decide the whole test split) were given."""

    test: frozenset[Patient] = frozenset()
    official: bool = False
    files: tuple[Path, ...] = ()


def open_batch(
    store: Store,
    cfg: BatchConfig,
    dataset: str,
    *,
    files: Sequence[Any],
    inputs: Iterable[Path | None],
    lists: SplitLists,
    patients: str | None = None,
    labels_digest: str | None = None,
) -> BatchRun | BatchSummary:
    """Start (or resume) the batch these inputs make; its summary if already committed.

    ``patients`` names how the batch finds patients beyond its input files (the DICOM
    attributes of ``--patient-attribute``): part of the identity when given, as is
    ``labels_digest``, the hash of labels that come from no single file (DICOM SEGs).

    Raises:
        ConfigError: another secret or other split fractions than the dataset's; a batch
            name taken by other inputs or being dropped.
    """
    inputs = list(inputs)
    secret = cfg.patient_secret or resolve_secret()
    wanted = SplitPolicy(
        fractions=cfg.split_fractions or DEFAULT_FRACTIONS,
        forced_test=frozenset(secret.key(p) for p in lists.test),
        test_from_lists=lists.official,
        secret_check=secret.check,
        lists=tuple(f"{f.name} {_sha256(f)}" for f in lists.files),
    )
    policy = batch_policy(store, wanted, cfg.split_fractions is not None)
    identity = batch_identity(
        files,
        inputs,
        policy.effective,
        relabel=cfg.relabel,
        patients=patients,
        labels_digest=labels_digest,
    )
    batch = cfg.batch or f"b{identity[:12]}"
    if cfg.batch and cfg.part is not None:  # one batch per part of the Indexed Job
        batch = layout.check_name("batch", f"{cfg.batch}-{cfg.part[0]}of{cfg.part[1]}")
    if store.exists(layout.drop_marker(dataset, batch)):
        raise ConfigError(
            f"batch {batch!r} of {dataset} is being dropped: finish with "
            f"`pneumo batch drop {cfg.out} {batch}`, then ingest again"
        )
    if batch in manifest.committed_batches(store, dataset):
        return already_committed(store, dataset, batch, identity, len(files))
    _check_record(store, dataset, batch, identity)
    lease = Lease(store, dataset, batch).acquire()
    if batch in manifest.committed_batches(store, dataset):  # committed while we looked
        lease.release()
        return already_committed(store, dataset, batch, identity, len(files))
    lease.__enter__()  # heartbeats until the batch commits or the attempt ends
    return BatchRun(
        store,
        cfg,
        dataset,
        batch,
        identity=identity,
        policy=policy,
        secret=secret,
        lease=lease,
        sources=describe_sources(files, inputs),
    )


def describe_sources(files: Sequence[Any], inputs: Iterable[Path | None]) -> dict[str, Any]:
    """Where a batch's inputs came from, for its record: the folders or prefixes of the
    source files with their counts and bytes (sizes are 0 for S3 listings), and the label,
    xref and list files."""
    roots: dict[str, dict[str, int]] = {}
    for f in files:
        entry = roots.setdefault(str(f.root), {"files": 0, "bytes": 0})
        entry["files"] += 1
        entry["bytes"] += int(f.size)
    return {
        "roots": roots,
        "inputs": [str(p) for p in inputs if p is not None],
    }


def _check_record(store: Store, dataset: str, batch: str, identity: str) -> None:
    """An uncommitted batch whose record names other inputs: a --batch name reused while
    its first attempt is unfinished."""
    try:
        record = json.loads(store.get(layout.batch_record(dataset, batch)))
    except (StoreError, ValueError):
        return
    if record.get("inputs") not in (None, identity):
        raise ConfigError(
            f"batch {batch!r} of {dataset} was begun with other inputs and is not committed: "
            f"give these files another --batch name, or `pneumo batch drop` it first"
        )


def batch_identity(
    files: Iterable[Any],
    inputs: Iterable[Path | None],
    policy: SplitPolicy,
    *,
    relabel: bool,
    patients: str | None = None,
    labels_digest: str | None = None,
) -> str:
    """A hash of everything that changes a batch's rows: the source files (names, sizes),
    the label, xref and list files (contents), the split policy, the patient rule (when
    the format has one: DICOM's ``--patient-attribute``), and relabelling.

    It names the batch by default, so re-running the same command finds the same batch.
    """
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.rel}:{f.size}\n".encode("utf-8", "surrogateescape"))
    for path in inputs:
        h.update(b"-\n" if path is None else f"{_sha256(path)}\n".encode())
    h.update(f"policy:{policy.fingerprint()}\nrelabel:{relabel}\n".encode())
    if patients is not None:  # absent for NIH: its batches keep the names they had
        h.update(f"patients:{patients}\n".encode())
    if labels_digest is not None:  # absent without SEG labels: batch names stay as they were
        h.update(f"labels:{labels_digest}\n".encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def already_committed(
    store: Store, dataset: str, batch: str, inputs: str, n_files: int
) -> BatchSummary:
    """A committed batch is never written again; other inputs under its name are an error."""
    try:
        record = json.loads(store.get(layout.batch_record(dataset, batch)))
    except StoreError:  # committed before batch records existed: nothing to compare
        record = {"inputs": inputs}
    if record.get("inputs") != inputs:
        raise ConfigError(
            f"batch {batch!r} is already committed with other inputs; "
            "give the new files a new --batch name"
        )
    chunks.discard(store, dataset, batch)  # left if killed right after the commit
    log.info("batch %s is already committed: nothing to add", batch)
    return BatchSummary(
        dataset=dataset, batch=batch, skipped=n_files, committed=True, already_committed=True
    )
