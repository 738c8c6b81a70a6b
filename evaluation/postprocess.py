"""The post-processing triplet of a RUN: how probability maps become submitted masks.

The triplet itself (:class:`PostProcess`: ``apply``, JSON) and its grid search
(:func:`search`, :class:`PostProcessSearch`) live in :mod:`training.metrics`, next to the
SIIM Dice they maximise, because ``pneumo train segment`` chooses the triplet on the
validation split at the end of a run and ``training`` cannot import ``evaluation``. They are
re-exported here for evaluation code; this module adds reading a RUN's choice back.
"""

from __future__ import annotations

import json
import logging

from shards.errors import StoreError
from shards.store import open_store
from training.metrics import PostProcess, PostProcessSearch, search
from training.runs import POSTPROCESS_FILE

__all__ = ["PostProcess", "PostProcessSearch", "search", "load_postprocess"]

log = logging.getLogger(__name__)


def load_postprocess(run: str) -> PostProcess:
    """The triplet stored in ``RUN/postprocess.json``; a plain 0.5 threshold without one.

    A run stopped before its end has no ``postprocess.json``: say so and fall back to
    ``PostProcess(0.5, 0, 0.5)``, the threshold the training validation used.

    Raises:
        StoreError: the file exists but is not a valid triplet.
    """
    store = open_store(run, create=False)
    if not store.exists(POSTPROCESS_FILE):
        log.warning("%s has no %s: using a plain 0.5 threshold", run, POSTPROCESS_FILE)
        return PostProcess()
    try:
        return PostProcess.from_dict(json.loads(store.get(POSTPROCESS_FILE)))
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{store.url_of(POSTPROCESS_FILE)} is not a valid triplet: {e}") from e
