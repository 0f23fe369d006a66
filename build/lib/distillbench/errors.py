"""User-facing errors: each message names the key or file at fault and the fix.

Entry points catch :class:`ConfigError` (and its subclasses), print the message and exit with status 2
before any work is written.
"""


class ConfigError(ValueError):
    """A configuration value that cannot work."""


class DataNotFoundError(ConfigError, FileNotFoundError):
    """Data files that are not where the config says."""


class MissingPackageError(ConfigError, ModuleNotFoundError):
    """An optional package that the chosen config needs."""


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (e.g. persistent non-finite values); its last good checkpoint is kept."""
