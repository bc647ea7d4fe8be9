"""The activation cache: the contract between stage one (teacher) and stage two (student)."""

from .layout import CacheError, Manifest
from .reader import Cache, open_cache
from .store import ArraySpec, CacheFiles, CacheWriter, WriterLock
from .verify import cache_info, verify_cache

__all__ = ["ArraySpec", "Cache", "CacheError", "CacheFiles", "CacheWriter", "Manifest", "WriterLock", "cache_info",
           "open_cache", "verify_cache"]
