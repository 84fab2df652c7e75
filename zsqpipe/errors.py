"""Exceptions whose message is a single line meant for the user (the CLI prints it and exits 1)."""


class ZsqError(Exception):
    """Base class: ``str(err)`` is one clear line naming the key or file and what was expected."""


class ConfigError(ZsqError):
    pass


class DataError(ZsqError):
    pass


class IntegrityError(ZsqError):
    """A file exists but is corrupt, truncated or does not match its manifest."""


class OutputError(ZsqError):
    """An output could not be written (disk full, quota, permissions); no partial file is left behind."""


class TrackingError(ZsqError):
    """The MLflow store cannot be created or reached by ``tracking-init`` (jobs themselves only warn)."""
