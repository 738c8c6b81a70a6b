"""shards -> checkpoints: the data stream, models, losses, the training loop and its tasks.

``training`` imports ``shards`` and nothing else of pneumo's.
"""
