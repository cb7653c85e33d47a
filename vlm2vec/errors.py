"""`DataError` and `ConfigError`, what bad input raises: the lowest module of the package (it imports
nothing), so the data readers, the media readers below them, the options and the evaluations all raise
and catch the same classes."""


class DataError(ValueError):
    """A bad file or row; the message starts with `<file>, row <i>` (or the hub source)."""


class ConfigError(ValueError):
    """A bad option: the message names it and says what is wrong."""
