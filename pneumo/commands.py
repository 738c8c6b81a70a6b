"""The commands that run models: ``train``, ``evaluate``, ``predict``, ``bench``, ``demo``."""
