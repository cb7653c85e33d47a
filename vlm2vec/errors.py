"""`DataError`, what bad input raises: the lowest module of the package (it imports nothing), so the
data readers, the media readers below them and the evaluations all raise and catch the same class."""


class DataError(ValueError):
    """A bad file or row; the message starts with `<file>, row <i>` (or the hub source)."""
