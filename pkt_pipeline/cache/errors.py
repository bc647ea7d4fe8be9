"""The cache's error type, in a module of its own so that `layout` and `codecs` both raise it."""


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, corrupt or not the one asked for."""
