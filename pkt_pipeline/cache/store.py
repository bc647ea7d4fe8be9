"""Byte-level access to a cache folder on local disk or any fsspec URL, and the cache writer.

The writer's contract: each group (= one zarr shard of every token-major array) is written
whole by exactly one process, then recorded in the ledger with the sha256 of every file it
wrote. A group without a ledger entry is simply written again, so a run killed at any point
resumes where it stopped and ends byte-identical to an uninterrupted one. The layout is made
identity first (`run.json`) and index last, so a folder whose creation was cut short is known
as this run's and made whole on the rerun. One writer at a time holds a cache (`WriterLock`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import posixpath
import socket
import stat
import sys
import time
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
import zarr.storage

from .layout import (
    FORMAT_NAME,
    INDEX_FILE,
    LEDGER_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    PARTIAL,
    RUN_FILE,
    ZARR_GROUP_FILE,
    ArraySpec,
    AttributionSummary,
    CacheError,
    ExtraEntry,
    Layout,
    Manifest,
    build_manifest,
    format_version_of,
    is_layout_entry,
    ledger_key,
)

_JSON_REMEDY = {
    MANIFEST_FILE: f"; delete {MANIFEST_FILE} and rerun the same `pkt extract` command to write it again",
}


class CacheFiles:
    """Files of one cache folder, local or remote, addressed by keys relative to its root."""

    def __init__(self, path: str | os.PathLike, storage_options: dict | None = None):
        self.url = os.fspath(path)
        # fsspec remembers directory listings per filesystem instance, and s3fs answers `exists` from
        # them: a ledger listed once would hide the groups other writers (ranks, a resumed run) add later.
        self.storage_options = {"use_listings_cache": False, **(storage_options or {})}
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

    def where(self, key: str) -> str:
        """A file's name as the user gave the cache: a path, or the URL and key."""
        return self.full(key) if self.is_local else f"{self.url.rstrip('/')}/{key}"

    def read_json(self, key: str) -> Any:
        """A JSON file of the cache; a torn or damaged one is named, not a JSON traceback."""
        try:
            return json.loads(self.read_bytes(key))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CacheError(f"{self.where(key)} is truncated or not valid JSON ({exc})"
                             f"{_JSON_REMEDY.get(key, '; the cache is damaged')}") from exc

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

    def remove(self, key: str) -> None:
        """Remove one file if it is there; one request on an object store, where a delete of nothing succeeds."""
        try:
            self.fs.rm_file(self.full(key))
        except FileNotFoundError:
            pass

    def remove_entries(self, names: list[str]) -> None:
        """Remove these top-level files and folders (and nothing else: never the root itself)."""
        for name in names:
            self.fs.rm(self.full(name), recursive=True)

    def zarr_store(self, read_only: bool):
        if self.is_local:
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)


class WriterLock:
    """The one writer of a cache: `<cache>/writer.lock` names its pid, host and start time.

    Local disk: the file is created with O_EXCL and its holder keeps an flock on it, which the
    kernel drops when the holder dies (kill -9 included); a lock left behind on this host is
    therefore known stale and taken over (where flock is unsupported: when its pid is not alive).
    A lock of another host is never taken over, its holder cannot be checked from here: the
    message names the file to delete. Other fsspec filesystems: a conditional create
    (`open(mode="xb")`, e.g. S3's If-None-Match) where the filesystem offers one, with the same
    same-host staleness check by pid; a filesystem without it gets no lock (a warning says so).
    """

    def __init__(self, files: CacheFiles, handle: int | None, made_root: bool):
        self.files = files
        self._handle = handle
        self._made_root = made_root
        self._held = True

    @classmethod
    def acquire(cls, path: str | os.PathLike, storage_options: dict | None = None) -> "WriterLock":
        """Take the lock of the cache at `path`, or raise CacheError naming its live holder."""
        files = CacheFiles(path, storage_options)
        made_root = not files.exists()
        if files.is_local:
            os.makedirs(files.root, exist_ok=True)
            return cls(files, _lock_local(files), made_root)
        return cls(files, None, made_root) if _lock_remote(files) else cls._unlocked(files)

    @classmethod
    def _unlocked(cls, files: CacheFiles) -> "WriterLock":
        print(f"warning: {files.url}: this filesystem offers no conditional create, so pkt cannot lock the cache; "
              "run one writer at a time", file=sys.stderr)
        lock = cls(files, None, False)
        lock._held = False
        return lock

    def release(self) -> None:
        """Remove the lock (only if it is still ours), and the folder the lock made if nothing else went in."""
        if not self._held:
            return
        self._held = False
        path = self.files.full(LOCK_FILE)
        if self._handle is None:
            self.files.fs.rm(path)
            return
        try:
            if os.stat(path).st_ino == os.fstat(self._handle).st_ino:
                os.unlink(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._handle)
        if self._made_root:
            try:
                os.rmdir(self.files.root)
            except OSError:
                pass

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_record() -> bytes:
    return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "command": " ".join(sys.argv)[:300]}, indent=2) + "\n").encode()


def _parse_holder(data: bytes) -> dict | None:
    try:
        holder = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder and "host" in holder else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flock(handle: int, wait: bool) -> bool | None:
    """True when taken, False when another process holds it, None when the filesystem has no flock."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _held_error(files: CacheFiles, holder: dict, same_host: bool) -> CacheError:
    message = (f"{files.url} is being written by another pkt process (pid {holder['pid']} on {holder['host']}, "
               f"since {holder.get('started', '?')}); wait for it to finish, or choose another --out")
    if not same_host:
        message += f". If that process is gone, delete {files.where(LOCK_FILE)} and rerun"
    return CacheError(message)


def _lock_local(files: CacheFiles) -> int:
    path = files.full(LOCK_FILE)
    record = _holder_record()
    host = socket.gethostname()
    empty_since = None
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            _flock(handle, wait=True)  # a contender checking the new, still empty file holds it only for an instant
            os.write(handle, record)
            os.fsync(handle)
            return handle
        try:
            handle = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # released between our two opens
        keep = False
        try:
            free = _flock(handle, wait=False)
            holder = _parse_holder(os.pread(handle, 1 << 16, 0))
            try:
                current = os.stat(path).st_ino == os.fstat(handle).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                continue
            if holder is None:  # its creator is between create and write, or died there
                empty_since = empty_since or time.monotonic()
                if free is False or time.monotonic() - empty_since < 2.0:
                    time.sleep(0.05)
                    continue
                holder = {"pid": -1, "host": host}
            same_host = holder["host"] == host
            stale = same_host and (free is True or (free is None and not _pid_alive(int(holder["pid"]))))
            if not stale:
                raise _held_error(files, holder, same_host)
            os.ftruncate(handle, 0)
            os.pwrite(handle, record, 0)
            os.fsync(handle)
            keep = True
            return handle
        finally:
            if not keep:
                os.close(handle)


def _lock_remote(files: CacheFiles) -> bool:
    """Take the lock with a conditional create; False when the filesystem cannot create conditionally."""
    path = files.full(LOCK_FILE)
    host = socket.gethostname()
    for _ in range(2):
        try:
            with files.fs.open(path, "xb") as handle:
                handle.write(_holder_record())
            return True
        except FileExistsError:
            pass
        except (NotImplementedError, ValueError, TypeError):
            return False
        holder = _parse_holder(files.read_bytes(LOCK_FILE)) or {"pid": "?", "host": "?"}
        same_host = holder["host"] == host
        if same_host and isinstance(holder["pid"], int) and not _pid_alive(holder["pid"]):
            files.fs.rm(path)
            continue
        raise _held_error(files, holder, same_host=False)
    raise _held_error(files, {"pid": "?", "host": "?"}, same_host=False)


def shard_file(array_key: str, ndim: int, group: int) -> str:
    """Key of the shard file holding group `group` of a token-major array (one shard across axis 1)."""
    return f"{array_key}/c/{group}" + "/0" * (ndim - 1)


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
        `overwrite`; a folder holding this run is reopened, to resume (also when its layout was
        cut short). `overwrite` replaces only a pkt cache: a folder holding anything pkt did not
        write is refused. With several writers, one process calls this with `create=True` first
        and the others with `create=False`; the caller holds the `WriterLock`.
        """
        files = CacheFiles(path)
        if create:
            try:
                existing = _prepare_folder(files, run, overwrite)
                if existing is None or not files.exists(INDEX_FILE):
                    _create_layout(files, run, index, arrays, codec)
            except OSError as exc:
                raise CacheError(f"creating the cache in {files.url} failed ({exc}); free space (or fix the error) "
                                 "and rerun the same command to resume") from exc
        elif not files.exists(INDEX_FILE):
            raise CacheError(f"{files.url} was not created by the first writer")
        return cls(files, run)

    @property
    def layout(self) -> Layout:
        return Layout.from_json(self.run["layout"], "layout")

    @property
    def shard_tokens(self) -> int:
        return self.layout.shard_tokens

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
            self.files.remove(shard)
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

    def finalize(self, attribution: AttributionSummary, extras: Mapping[str, ExtraEntry]) -> Manifest:
        """Check every group is in the ledger, gather checksums and write the manifest last."""
        groups = self.layout.groups
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
            if key == LOCK_FILE:
                continue
            if PARTIAL in key:  # a write killed before its rename; every writer has finished by now
                self.files.fs.rm(self.files.full(key))
                continue
            if key in data_files or key == MANIFEST_FILE or key.startswith(LEDGER_DIR + "/"):
                continue
            checksums[key] = self.files.sha256(key)
        stats["stored_bytes"] = sum(self.files.size(k) for k, v in checksums.items() if v is not None)
        manifest = build_manifest(self.run, attribution, extras, stats["stored_bytes"], checksums,
                                  self.files.where(MANIFEST_FILE))
        self.files.write_json(MANIFEST_FILE, manifest.to_json())
        return manifest


def _prepare_folder(files: CacheFiles, run: dict, overwrite: bool) -> dict | None:
    """The run record already in `files` (this run's: resume it), or None once the folder is ready for a new cache.

    Only what pkt recognisably wrote is ever removed: a folder with a pkt `run.json`, or one whose
    every entry is a cache file of pkt's and whose zarr group is marked as pkt's (a layout cut
    short before its `run.json` by an earlier version). Anything else is refused as it is.
    """
    entries = [name for name in files.listdir("") if name.split(PARTIAL, 1)[0] != LOCK_FILE]
    if not entries:
        return None
    try:
        existing = files.read_json(RUN_FILE) if RUN_FILE in entries else None
    except CacheError:
        existing = "unreadable"
    ours = isinstance(existing, dict) and isinstance(existing.get("identity"), dict)
    if not ours and not (existing is None and all(map(is_layout_entry, entries)) and _pkt_group(files, entries)):
        raise CacheError(f"{files.url} exists and is not a pkt cache (it holds {_names(entries)}); pkt neither writes "
                         "into nor deletes a folder it did not make: choose another --out")
    if ours and existing["identity"] == run["identity"]:
        if not files.exists(INDEX_FILE) and files.listdir(LEDGER_DIR):
            raise CacheError(f"{files.url} has written groups but no {INDEX_FILE}: the cache is damaged; pass "
                             "--overwrite to replace it")
        return existing
    if ours and not overwrite:
        differ = sorted(k for k in {*existing["identity"], *run["identity"]}
                        if existing["identity"].get(k) != run["identity"].get(k))
        raise CacheError(
            f"{files.url} already holds a different cache ({_describe(existing)}); this run is "
            f"{_describe(run)}; they differ in {', '.join(differ)}. Choose another --out, or pass "
            f"--overwrite to replace it."
        )
    if not ours and not overwrite and (files.listdir(LEDGER_DIR) or MANIFEST_FILE in entries):
        raise CacheError(f"{files.url} holds cache data but no {RUN_FILE}, so it cannot be resumed; pass --overwrite "
                         "to replace it, or choose another --out")
    foreign = [name for name in entries if not is_layout_entry(name)]
    if foreign:
        raise CacheError(f"{files.url} is a pkt cache but also holds files pkt did not write ({_names(foreign)}); "
                         "pkt will not delete them: move them out of it, or choose another --out")
    files.remove_entries(entries)
    return None


def _pkt_group(files: CacheFiles, entries: list[str]) -> bool:
    """No zarr group yet, or one marked as a pkt cache."""
    if ZARR_GROUP_FILE not in entries:
        return True
    try:
        metadata = files.read_json(ZARR_GROUP_FILE)
    except CacheError:
        return False
    return isinstance(metadata, dict) and (metadata.get("attributes") or {}).get("pkt_format") == FORMAT_NAME


def _names(entries: list[str], shown: int = 5) -> str:
    return ", ".join(entries[:shown]) + (f" and {len(entries) - shown} more" if len(entries) > shown else "")


def _create_layout(files: CacheFiles, run: dict, index: pa.Table, arrays: list[ArraySpec], codec) -> None:
    """Identity first, index last: whatever is here after a cut is this run's, and redone whole.

    Idempotent (a rerun of a layout cut short calls it again), and never `mode="w"`, which would
    delete the whole folder, the writer's lock included.
    """
    layout = run["layout"]
    rows = layout["groups"] * layout["shard_tokens"]
    files.write_json(RUN_FILE, run)
    group = zarr.open_group(files.zarr_store(read_only=False), mode="a", zarr_format=3)
    group.update_attributes({"pkt_format": FORMAT_NAME, "pkt_format_version": format_version_of(run["capture"])})
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
            overwrite=True,
        )
    buffer = io.BytesIO()
    pq.write_table(index, buffer, compression="zstd")
    files.write_bytes(INDEX_FILE, buffer.getvalue())


def _describe(run: dict) -> str:
    identity = run["identity"]
    return f"teacher {identity['teacher']} ({identity['teacher_weights_sha256'][:12]}), data fingerprint {identity['dataset_fingerprint'][:12]}"
