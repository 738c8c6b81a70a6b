"""pneumo's own exceptions. The CLI turns any of them into one clear line and exit code 1."""


class PneumoError(Exception):
    """Base of every error pneumo raises on purpose; the message says what to do next."""


class StoreError(PneumoError):
    """The object store cannot be reached, or an object is missing or unreadable."""


class ManifestError(PneumoError):
    """A manifest is missing, has the wrong schema, or a query on it is malformed."""


class ConfigError(PneumoError):
    """A configuration value is invalid (bad option, inconsistent settings)."""


class IntegrityError(StoreError, ManifestError):
    """The stored shards and the manifest disagree: a sample's shard is gone, cut short, or
    holds other bytes than the manifest's ``content_sha256``. Both a store error (the data
    at rest is damaged) and a manifest error (its rows name what is not there): the message
    names the shard and the key, and ``pneumo verify DATASET`` lists every such sample."""
