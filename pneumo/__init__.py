"""pneumo: chest X-ray archives -> WebDataset shards -> trained pneumothorax models."""

__version__ = "0.1.0"
