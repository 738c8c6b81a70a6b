"""The post-processing triplet a RUN chose, read back for evaluation and prediction.

The triplet itself (:class:`~pneumo.metrics.siim.PostProcess`: ``apply``, JSON) and its
grid search live in :mod:`pneumo.metrics.siim`, beside the SIIM Dice they maximise: ``pneumo
train segment`` searches it on the validation split at the end of a run, and evaluation
applies it. This module reads a RUN's choice.

A run records the better of two searches (with and without flip TTA) in
``postprocess.json`` and both in ``postprocess_search.json``: a triplet is only ever applied
to probabilities made the way it was searched on.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pneumo.metrics.siim import PostProcess
from pneumo.shards.errors import ConfigError, StoreError
from pneumo.shards.store import Store, open_store
from pneumo.training.fullres import SEARCH_FILE
from pneumo.training.runs import POSTPROCESS_FILE

log = logging.getLogger(__name__)


def load_postprocess(run: str, tta: bool | None = None) -> PostProcess:
    """The triplet of ``run`` for the TTA setting ``tta`` (None: the one the run chose).

    A run stopped before its end has no ``postprocess.json``: say so and fall back to a
    plain 0.5 threshold (``PostProcess(0.5, 0, 0.5)``), the threshold training validates at.

    Raises:
        StoreError: a file exists but does not hold valid triplets.
        ConfigError: ``tta`` differs from the run's choice and no triplet was searched
            with that setting (a run trained before both were searched).
    """
    store = open_store(run, create=False)
    if not store.exists(POSTPROCESS_FILE):
        log.warning("%s has no %s: using a plain 0.5 threshold", run, POSTPROCESS_FILE)
        return PostProcess(tta=bool(tta))
    chosen = _triplet(store, POSTPROCESS_FILE, _read(store, POSTPROCESS_FILE))
    if tta is None or tta == chosen.tta:
        return chosen
    if store.exists(SEARCH_FILE):
        for entry in _read(store, SEARCH_FILE).get("by_tta", []):
            if bool(entry.get("tta")) == tta:
                return _triplet(store, SEARCH_FILE, entry)
    raise ConfigError(
        f"{store.url_of(POSTPROCESS_FILE)} was searched with TTA {'on' if chosen.tta else 'off'} "
        f"and the run holds no triplet searched with TTA {'on' if tta else 'off'}: "
        f"run without {'--tta' if tta else '--no-tta'}"
    )


def _read(store: Store, path: str) -> dict[str, Any]:
    try:
        return json.loads(store.get(path))
    except ValueError as e:
        raise StoreError(f"{store.url_of(path)} is not valid JSON: {e}") from e


def _triplet(store: Store, path: str, d: dict[str, Any]) -> PostProcess:
    try:
        return PostProcess.from_dict(d)
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{store.url_of(path)} is not a valid triplet: {e}") from e
