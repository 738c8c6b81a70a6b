"""samples <-> object storage: the store, tar shards, the Parquet manifest, the streaming
reader, and the default selections every other part filters the manifest with.

``shards`` imports none of pneumo's other parts.
"""
