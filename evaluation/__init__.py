"""checkpoints -> numbers and pictures: SIIM evaluation, post-processing, predictions.

``evaluation`` may import ``training``, ``ingest`` and ``shards``; nothing imports it.
"""
