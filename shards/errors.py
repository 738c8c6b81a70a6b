"""pneumo's own exceptions. The CLI turns any of them into one clear line and exit code 1."""


class PneumoError(Exception):
    """Base of every error pneumo raises on purpose; the message says what to do next."""


class StoreError(PneumoError):
    """The object store cannot be reached, or an object is missing or unreadable."""


class ManifestError(PneumoError):
    """A manifest is missing, has the wrong schema, or a query on it is malformed."""


class ConfigError(PneumoError):
    """A configuration value is invalid (bad option, inconsistent settings)."""
