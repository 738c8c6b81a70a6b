"""samples <-> object storage: the store, tar shards, the Parquet manifest, the streaming reader.

``shards`` imports none of pneumo's other packages.
"""
