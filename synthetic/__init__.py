"""Synthetic chest X-rays and archives, for the demo, the benchmarks and the tests.

``chest``: the pictures (a cartoon radiograph with a learnable pneumothorax, a bright-block
stand-in a tiny CNN learns in a few steps, a textured frame that costs a decoder what a
chest does); ``archives``: those pictures in the exact on-disk formats of SIIM-ACR (JPEG
DICOMs + RLE CSV) and NIH ChestX-ray14 (PNGs + Data_Entry + split lists).

``synthetic`` imports ``ingest`` (RLE, mask PNGs) and ``shards``; nothing of pneumo's
library imports it but the experiment's demo.
"""
