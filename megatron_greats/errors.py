"""User-facing errors: each is reported as one line and a non-zero exit, before heavy work starts."""


class GreatsError(Exception):
    """Base class of the errors the launcher prints as a single line (no traceback)."""

    exit_code = 2


class ConfigError(GreatsError):
    """A config key, value or combination of values is not allowed."""


class DataError(GreatsError):
    """Input data is missing, unreadable, corrupted or unsuitable."""


class TrainingError(GreatsError):
    """Training cannot go on (e.g. too many non-finite steps in a row); a checkpoint was saved first."""

    exit_code = 3


class DependencyError(GreatsError):
    """An installed package does not fit (e.g. a DeepSpeed release outside the supported range)."""
