"""pneumo: chest X-ray archives -> WebDataset shards -> trained pneumothorax models.

One import name; its parts, each a top-level folder of the repository, in the order data
flows (each imports only parts above it in this list):

- ``pneumo.shards``: samples <-> object storage (store, tar shards, manifest, stream);
- ``pneumo.ingest``: source formats -> samples (DICOM, SIIM RLE, NIH tables, the ingest run);
- ``pneumo.synthetic``: synthetic chest X-rays and archives (demo, benchmarks, tests);
- ``pneumo.metrics``: the SIIM Dice, the post-processing triplet, classification scores;
- ``pneumo.training``: shards -> checkpoints (loader, models, losses, loop, tasks);
- ``pneumo.pseudolabels``: embeddings -> PCA -> clusters -> pseudo-labels;
- ``pneumo.evaluation``: checkpoints -> numbers, plots, predictions;
- ``pneumo.experiment``: recipes -> Table 1;
- ``pneumo.cli`` and ``pneumo.commands``: the command line, on top.
"""

__version__ = "0.1.0"
