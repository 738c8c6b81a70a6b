"""shards -> checkpoints: the data stream, models, losses, the training loop and its tasks.

``training`` imports ``shards`` and ``metrics`` and nothing else of pneumo.
"""
