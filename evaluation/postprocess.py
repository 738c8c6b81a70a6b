"""The post-processing triplet of a RUN: how probability maps become submitted masks.

The triplet itself (:class:`PostProcess`: ``apply``, JSON) and its grid search
(:func:`search`, :class:`PostProcessSearch`) live in :mod:`training.metrics`, next to the
SIIM Dice they maximise, because ``pneumo train segment`` chooses the triplet on the
validation split at the end of a run and ``training`` cannot import ``evaluation``. They are
re-exported here for evaluation code; this module adds reading a RUN's choice back.

A run records the better of two searches (with and without flip TTA) in
``postprocess.json`` and both in ``postprocess_search.json``: a triplet is only ever applied
to probabilities made the way it was searched on.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from shards.errors import ConfigError, StoreError
from shards.store import Store, open_store
from training.fullres import SEARCH_FILE
from training.metrics import PostProcess, PostProcessSearch, search
from training.runs import POSTPROCESS_FILE

__all__ = ["PostProcess", "PostProcessSearch", "search", "load_postprocess"]

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
