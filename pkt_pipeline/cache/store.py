"""Byte-level access to a cache folder on local disk or any fsspec URL, and the cache writer.

The writer's contract: each group (= one zarr shard of every token-major array) is written
whole by exactly one process, then recorded in the ledger with the sha256 of every file it
wrote. A group without a ledger entry is simply written again, so a run killed at any point
resumes where it stopped and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
import zarr.storage

from .layout import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    LEDGER_DIR,
    MANIFEST_FILE,
    RUN_FILE,
    CacheError,
    ledger_key,
)


class CacheFiles:
    """Files of one cache folder, local or remote, addressed by keys relative to its root."""

    def __init__(self, path: str | os.PathLike, storage_options: dict | None = None):
        self.url = os.fspath(path)
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def full(self, key: str) -> str:
        return posixpath.join(self.root, key) if key else self.root

    def exists(self, key: str = "") -> bool:
        return self.fs.exists(self.full(key))

    def safe_path(self, key: str) -> str:
        """The full path of `key`, refused unless it stays inside the cache and is a regular file (or absent).

        Keys come from files a cache holds (manifest, ledger), which anyone may have crafted: an
        absolute or `..` key, or a link leading outside or to a device, would make pkt read (or hang
        on) files that are not the cache's.
        """
        parts = key.split("/") if isinstance(key, str) else [""]
        if not key or key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in parts):
            raise self._unsafe(key, "not a plain relative path inside the cache")
        full = self.full(key)
        if self.is_local:
            root = os.path.realpath(self.root)
            real = os.path.realpath(full)
            if os.path.commonpath([root, real]) != root:
                raise self._unsafe(key, f"it leads outside the cache, to {real}")
            try:
                mode = os.stat(real).st_mode
            except FileNotFoundError:
                return full
            if not stat.S_ISREG(mode):
                raise self._unsafe(key, "not a regular file")
        return full

    def _unsafe(self, key: str, why: str) -> CacheError:
        return CacheError(f"{self.url} is a corrupt pkt cache: unsafe path {key!r} ({why}); pkt reads only "
                          "regular files inside the cache folder")

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.safe_path(key))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a small file so that readers see the old content or the new, never a torn one."""
        target = self.full(key)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            partial = f"{target}.partial-{os.getpid()}"
            with open(partial, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        else:
            self.fs.pipe_file(target, data)

    def write_json(self, key: str, value: Any) -> None:
        self.write_bytes(key, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def sha256(self, key: str) -> str | None:
        """sha256 of a file, or None when it does not exist (an all-fill shard is never written)."""
        digest = hashlib.sha256()
        try:
            with self.fs.open(self.safe_path(key), "rb") as handle:
                while chunk := handle.read(8 << 20):
                    digest.update(chunk)
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def size(self, key: str) -> int:
        return self.fs.size(self.safe_path(key))

    def listdir(self, key: str) -> list[str]:
        if not self.exists(key):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.full(key), detail=False))

    def walk_files(self) -> list[str]:
        """Every file below the root, as keys."""
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in self.fs.find(self.root) if p.startswith(prefix))

    def remove_all(self) -> None:
        if self.exists():
            self.fs.rm(self.root, recursive=True)

    def zarr_store(self, read_only: bool):
        if self.is_local:
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)


def shard_file(array_key: str, ndim: int, group: int) -> str:
    """Key of the shard file holding group `group` of a token-major array (one shard across axis 1)."""
    return f"{array_key}/c/{group}" + "/0" * (ndim - 1)


@dataclass(frozen=True)
class ArraySpec:
    """A token-major array: `row_shape` is the shape of one token's row."""

    key: str
    row_shape: tuple[int, ...]
    dtype: str
    attributes: dict = field(default_factory=dict)


class CacheWriter:
    """Creates (or reopens, to resume) a cache and writes whole groups into it."""

    def __init__(self, files: CacheFiles, run: dict):
        self.files = files
        self.run = run
        self.group = zarr.open_group(files.zarr_store(read_only=False), mode="a", zarr_format=3)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        run: dict,
        index: pa.Table,
        arrays: list[ArraySpec],
        codec,
        overwrite: bool = False,
        create: bool = True,
    ) -> "CacheWriter":
        """Open the cache at `path` for writing `run`, creating it unless it is that run's own.

        A folder holding another run (other teacher, data or settings) is refused unless
        `overwrite`; a folder holding this run is reopened, to resume. With several writers,
        one process calls this with `create=True` first and the others with `create=False`.
        """
        files = CacheFiles(path)
        if create:
            existing = files.read_json(RUN_FILE) if files.exists(RUN_FILE) else None
            if existing is not None and existing["identity"] != run["identity"] and not overwrite:
                differ = sorted(k for k in {*existing["identity"], *run["identity"]}
                                if existing["identity"].get(k) != run["identity"].get(k))
                raise CacheError(
                    f"{files.url} already holds a different cache ({_describe(existing)}); this run is "
                    f"{_describe(run)}; they differ in {', '.join(differ)}. Choose another --out, or pass "
                    f"--overwrite to replace it."
                )
            if existing is None and files.exists() and files.listdir("") and not overwrite:
                raise CacheError(f"{files.url} exists and is not a pkt cache; choose another --out or pass --overwrite")
            if overwrite and (existing is None or existing["identity"] != run["identity"]):
                files.remove_all()
                existing = None
            if existing is None:
                _create_layout(files, run, index, arrays, codec)
        elif not files.exists(RUN_FILE):
            raise CacheError(f"{files.url} was not created by the first writer")
        return cls(files, run)

    @property
    def shard_tokens(self) -> int:
        return self.run["layout"]["shard_tokens"]

    def finished_groups(self) -> set[int]:
        return {int(name[len("group-"):-len(".json")]) for name in self.files.listdir(LEDGER_DIR) if name.endswith(".json")}

    def write_group(self, group: int, blocks: dict[str, np.ndarray], stats: dict) -> None:
        """Write one group's shard of every token-major array, then record it in the ledger.

        Blocks may stop short of the shard's end (at a chunk boundary); the rest stays fill
        value. A shard file left by an interrupted attempt is removed first, so zarr never
        merges new rows into a torn file.
        """
        start = group * self.shard_tokens
        checksums = {}
        for key, block in blocks.items():
            if block.shape[0] > self.shard_tokens:
                raise CacheError(f"group block for {key} has {block.shape[0]} rows, more than a shard ({self.shard_tokens})")
            shard = shard_file(key, block.ndim, group)
            if self.files.exists(shard):
                self.files.fs.rm(self.files.full(shard))
            self.group[key][start:start + block.shape[0]] = block
            checksums[shard] = self.files.sha256(shard)
        self.files.write_json(ledger_key(group), {"group": group, "files": checksums, **stats})

    def write_array(self, key: str, data: np.ndarray, chunks: tuple[int, ...], codec, attributes: dict) -> None:
        """Write a small whole array (attribution scores, teacher weights); not token-major."""
        array = self.group.create_array(
            key, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=codec,
            fill_value=0, attributes=attributes, overwrite=True,
        )
        array[...] = data

    def finalize(self, manifest: dict) -> dict:
        """Check every group is in the ledger, gather checksums and write the manifest last."""
        groups = self.run["layout"]["groups"]
        missing = sorted(set(range(groups)) - self.finished_groups())
        if missing:
            raise CacheError(f"cannot finalize {self.files.url}: groups {missing[:10]} are not written yet")
        checksums: dict[str, str | None] = {}
        stats = {"tokens": 0, "stored_bytes": 0}
        for group in range(groups):
            entry = self.files.read_json(ledger_key(group))
            checksums.update(entry["files"])
        data_files = set(checksums)
        for key in self.files.walk_files():
            if key in data_files or key == MANIFEST_FILE or key.startswith(LEDGER_DIR + "/") or ".partial" in key:
                continue
            checksums[key] = self.files.sha256(key)
        stats["stored_bytes"] = sum(self.files.size(k) for k, v in checksums.items() if v is not None)
        full = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **self.run,
            **manifest,
            "stored_bytes": stats["stored_bytes"],
            "checksums": dict(sorted(checksums.items())),
        }
        self.files.write_json(MANIFEST_FILE, full)
        return full


def _create_layout(files: CacheFiles, run: dict, index: pa.Table, arrays: list[ArraySpec], codec) -> None:
    layout = run["layout"]
    rows = layout["groups"] * layout["shard_tokens"]
    group = zarr.open_group(files.zarr_store(read_only=False), mode="w", zarr_format=3,
                            attributes={"pkt_format": FORMAT_NAME, "pkt_format_version": FORMAT_VERSION})
    for spec in arrays:
        group.create_array(
            spec.key,
            shape=(rows, *spec.row_shape),
            chunks=(layout["chunk_tokens"], *spec.row_shape),
            shards=(layout["shard_tokens"], *spec.row_shape),
            dtype=spec.dtype,
            compressors=codec,
            fill_value=0,
            attributes=spec.attributes,
        )
    buffer = io.BytesIO()
    pq.write_table(index, buffer, compression="zstd")
    files.write_bytes(INDEX_FILE, buffer.getvalue())
    files.write_json(RUN_FILE, run)


def _describe(run: dict) -> str:
    identity = run["identity"]
    return f"teacher {identity['teacher']} ({identity['teacher_weights_sha256'][:12]}), data fingerprint {identity['dataset_fingerprint'][:12]}"
