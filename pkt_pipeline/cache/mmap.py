"""Zero-copy reads of an uncompressed cache on local disk: chunks as `np.memmap` views of the shard files.

A shard written by zarr v3's sharding codec (`sharding_indexed`) is its chunks' encoded bytes plus an
index: one (offset, nbytes) pair of uint64 per chunk, in C order of the shard's chunk grid, at the
file's start or end, encoded by the index codecs (`bytes` little-endian, then a crc32c of the index
when configured). Offset and nbytes both 2**64-1 mean the chunk was never written (all fill value).
With no compressor a chunk's bytes *are* its C-order array, so a run of rows is a view of the mapped
file: nothing decoded, no private copy, and the ranks of one node reading one cache share a single
copy of it in the page cache. A compressed cache, or one on another filesystem, keeps zarr's
decoding reads; `choose_read_path` says which, and why.

Shard files are never rewritten in place (the writer removes one before writing it again), so a view
stays valid while a rerun of `pkt extract` replaces the file under it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import google_crc32c
import numpy as np

from .layout import CacheError
from .store import CacheFiles

ReadPath = Literal["auto", "mmap", "zarr"]
READ_PATHS: tuple[str, ...] = ("auto", "mmap", "zarr")
MISSING = 2**64 - 1
"""Offset and nbytes of a chunk absent from its shard (the sharding codec's empty-chunk marker)."""
_ENTRY_BYTES, _CRC_BYTES = 16, 4


@dataclass(frozen=True)
class ShardLayout:
    """What a token-major array's `zarr.json` says about its shards, for an array that can be mapped."""

    dtype: np.dtype
    row_shape: tuple[int, ...]
    shard_rows: int
    chunk_rows: int
    index_at_start: bool
    index_crc32c: bool
    fill_value: Any

    @property
    def chunks(self) -> int:
        """Chunks per shard: a token-major shard is one column of whole-row chunks."""
        return self.shard_rows // self.chunk_rows

    @property
    def index_bytes(self) -> int:
        return self.chunks * _ENTRY_BYTES + _CRC_BYTES * self.index_crc32c

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * math.prod(self.row_shape) * self.dtype.itemsize


def _little_bytes(codec: dict) -> bool:
    """A `bytes` codec writing little-endian (or no byte order: one-byte types)."""
    return codec.get("name") == "bytes" and (codec.get("configuration") or {}).get("endian", "little") == "little"


def shard_layout(key: str, metadata: dict) -> ShardLayout | str:
    """The layout of array `key` from its zarr v3 metadata, or why its shards cannot be mapped."""
    codecs = metadata.get("codecs") or []
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return f"{key} is not stored in zarr shards"
    sharding = codecs[0].get("configuration") or {}
    inner = sharding.get("codecs") or []
    if len(inner) != 1 or not _little_bytes(inner[0]):
        names = "+".join(codec.get("name", "?") for codec in inner if codec.get("name") != "bytes")
        return f"{key} is compressed ({names or 'big-endian bytes'})"
    index_codecs = sharding.get("index_codecs") or []
    names = [codec.get("name") for codec in index_codecs]
    if not index_codecs or not _little_bytes(index_codecs[0]) or names[1:] not in ([], ["crc32c"]):
        return f"{key} has a shard index encoded with {names}, not little-endian bytes (+ crc32c)"
    shape = list(metadata.get("shape") or [])
    shard_shape = list(((metadata.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape") or [])
    chunk_shape = list(sharding.get("chunk_shape") or [])
    if (not shape or len(shard_shape) != len(shape) or len(chunk_shape) != len(shape) or shard_shape[1:] != shape[1:]
            or chunk_shape[1:] != shape[1:] or shard_shape[0] % chunk_shape[0]):
        return f"{key} is not token-major (shards {shard_shape} and chunks {chunk_shape} of whole rows of {shape})"
    if metadata.get("storage_transformers") or sys.byteorder != "little":
        return f"{key} uses storage transformers or this machine is big-endian"
    try:
        dtype = np.dtype(metadata["data_type"])
    except (KeyError, TypeError):
        return f"{key} has data type {metadata.get('data_type')!r}, which numpy cannot view"
    return ShardLayout(dtype=dtype, row_shape=tuple(shape[1:]), shard_rows=shard_shape[0], chunk_rows=chunk_shape[0],
                       index_at_start=sharding.get("index_location", "end") == "start",
                       index_crc32c=names[1:] == ["crc32c"], fill_value=metadata.get("fill_value", 0))


def choose_read_path(files: CacheFiles, keys: Iterable[str], metadata: Callable[[str], dict]) -> tuple[str, str]:
    """`("mmap" | "zarr", why)` for a cache's token-major arrays `keys`, `metadata(key)` giving each `zarr.json`.

    Mapping pays only where the bytes on disk are the array (no compressor) and the kernel can map
    them (a local filesystem); everything else is read through zarr, as before.
    """
    if not files.is_local:
        protocol = files.fs.protocol if isinstance(files.fs.protocol, str) else files.fs.protocol[0]
        return "zarr", f"not on a local filesystem ({protocol}): zarr's reads through fsspec"
    for key in keys:
        layout = shard_layout(key, metadata(key))
        if isinstance(layout, str):
            return "zarr", f"{layout}: zarr's decoding reads"
    return "mmap", "uncompressed shards on a local filesystem: zero-copy views, one page-cache copy per node"


def read_shard_index(path: str, layout: ShardLayout) -> np.ndarray:
    """[chunks, 2] uint64, (offset, nbytes) of each chunk of the shard file at `path`, its crc32c checked."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < layout.index_bytes:
            raise CacheError(f"{path} is damaged: {size} bytes, shorter than its shard index ({layout.index_bytes} "
                             "bytes); rerun `pkt extract` with the same settings and --out to rewrite it")
        handle.seek(0 if layout.index_at_start else size - layout.index_bytes)
        raw = handle.read(layout.index_bytes)
    body = raw[:layout.chunks * _ENTRY_BYTES]
    if layout.index_crc32c:
        stored, actual = int.from_bytes(raw[-_CRC_BYTES:], "little"), google_crc32c.value(body)
        if stored != actual:
            raise CacheError(f"{path} is damaged: its shard index fails its crc32c (stored {stored:08x}, computed "
                             f"{actual:08x}); rerun `pkt extract` with the same settings and --out to rewrite it")
    index = np.frombuffer(body, dtype="<u8").reshape(layout.chunks, 2)
    present = index[:, 0] != MISSING
    ends = index[present, 0] + index[present, 1]
    if (index[present, 1] != layout.chunk_bytes).any() or (ends > size).any():
        raise CacheError(f"{path} is damaged or compressed: its index gives chunks other than the "
                         f"{layout.chunk_bytes} raw bytes each of an uncompressed shard within its {size} bytes")
    return index


class MappedArray:
    """One token-major array read as views of its mapped shard files; each shard's index is read once."""

    def __init__(self, key: str, layout: ShardLayout):
        self.key, self.layout = key, layout
        self._indexes: dict[str, np.ndarray] = {}

    @property
    def ndim(self) -> int:
        return 1 + len(self.layout.row_shape)

    def rows(self, path: str | None, group: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the array, all inside group `group`'s shard at `path` (None: never written).

        A read-only view of the mapped file when the rows' chunks lie back to back in it (how zarr
        writes a whole shard); chunks that are absent (all fill value) or out of order are copied together.
        """
        layout = self.layout
        first = group * layout.shard_rows
        low, high = start - first, stop - first
        if not 0 <= low <= high <= layout.shard_rows:
            raise ValueError(f"rows [{start}, {stop}) of {self.key} are not inside group {group}")
        if path is None or low == high:
            return np.full((high - low, *layout.row_shape), layout.fill_value, dtype=layout.dtype)
        index = self._indexes.get(path)
        if index is None:
            index = self._indexes[path] = read_shard_index(path, layout)
        c0, c1 = low // layout.chunk_rows, (high - 1) // layout.chunk_rows + 1
        offsets, sizes = index[c0:c1, 0], index[c0:c1, 1]
        skip = low - c0 * layout.chunk_rows
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        if (offsets != MISSING).all() and (offsets[1:] == offsets[:-1] + sizes[:-1]).all():
            region = mapped[int(offsets[0]):int(offsets[0]) + (c1 - c0) * layout.chunk_bytes]
            return region.view(layout.dtype).reshape(-1, *layout.row_shape)[skip:skip + high - low]
        out = np.full(((c1 - c0) * layout.chunk_rows, *layout.row_shape), layout.fill_value, dtype=layout.dtype)
        for i, (offset, size) in enumerate(zip(offsets.tolist(), sizes.tolist())):
            if offset != MISSING:
                rows = slice(i * layout.chunk_rows, (i + 1) * layout.chunk_rows)
                out[rows] = mapped[offset:offset + size].view(layout.dtype).reshape(-1, *layout.row_shape)
        return out[skip:skip + high - low]
