"""checkpoints -> numbers and pictures: SIIM evaluation, post-processing, predictions.

``evaluation`` may import ``training``, ``metrics``, ``ingest`` and ``shards``; only the
experiment and the CLI import it.
"""
