"""source formats -> samples: DICOM decode, SIIM RLE, label CSVs, NIH Data_Entry, the ingest run.

``ingest`` imports ``shards`` and nothing else of pneumo's parts.
"""
