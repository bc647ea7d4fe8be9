"""`pkt cache verify` and `pkt cache info`: is a cache whole, and what does it hold."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import zarr

from .layout import INDEX_FILE, LEDGER_DIR, MANIFEST_FILE, RUN_FILE, CacheError, Manifest, ledger_key
from .mmap import choose_read_path
from .store import CacheFiles

TOKEN_MAJOR = ("tokens", "supervised", "answer", "spans", "target_logprob", "hidden", "delta", "topk")
"""First key segments of the per-token arrays: their rows are tokens of examples, named by the index."""


def token_major_arrays(manifest: Manifest) -> list[str]:
    """Keys of the cache's per-token arrays, from the manifest's checksums of their `zarr.json`."""
    suffix = "/zarr.json"
    nodes = {key[:-len(suffix)] for key in manifest.checksums
             if key.endswith(suffix) and key.split("/")[0] in TOKEN_MAJOR}
    groups = {node.rsplit("/", 1)[0] for node in nodes if "/" in node}  # `hidden` of `hidden/02`
    return sorted(nodes - groups)


def verify_cache(path: str | os.PathLike, storage_options: dict | None = None) -> list[str]:
    """Every problem found, each naming the file; an empty list means the cache is whole.

    A finished cache is checked against its manifest's checksums, then every float array it
    stores is scanned for NaN/inf. An unfinished one (no manifest yet) is checked against its
    ledger, which says which groups are done and safe.
    """
    files = CacheFiles(path, storage_options)
    if not files.exists(RUN_FILE):
        return [f"{files.url}: not a pkt cache ({RUN_FILE} missing)"]
    problems = []
    finished = files.exists(MANIFEST_FILE)
    if not finished:
        problems.append(f"{MANIFEST_FILE} missing: the extraction did not finish; rerun it to resume")
    problems += list(damaged_files(files).values())
    if finished and not problems:
        problems += non_finite_values(files)
    return problems


def expected_checksums(files: CacheFiles) -> tuple[dict[str, str | None], dict[str, str]]:
    """(key -> sha256 or None for a shard never written, unreadable ledger entries -> problem).

    From the manifest of a finished cache, else from the ledger of the groups written so far.
    """
    if files.exists(MANIFEST_FILE):
        return dict(Manifest.read(files).checksums), {}
    expected: dict[str, str | None] = {}
    unreadable: dict[str, str] = {}
    for group in range(files.read_json(RUN_FILE)["layout"]["groups"]):
        key = ledger_key(group)
        if files.exists(key):
            try:
                expected.update(files.read_json(key)["files"])
            except (ValueError, KeyError, TypeError) as error:
                unreadable[key] = f"unreadable ledger entry: {key} ({type(error).__name__}: {error})"
    return expected, unreadable


def damaged_files(files: CacheFiles, expected: dict[str, str | None] | None = None) -> dict[str, str]:
    """{key: problem} for every file that is missing, changed, unexpectedly present or not safe to read."""
    problems: dict[str, str] = {}
    if expected is None:
        expected, problems = expected_checksums(files)
    for key, checksum in sorted(expected.items()):
        problem = file_problem(files, key, checksum)
        if problem:
            problems[key] = problem
    return problems


def file_problem(files: CacheFiles, key: str, checksum: str | None) -> str | None:
    """What is wrong with one file against its recorded checksum (None: an all-fill shard never written)."""
    try:
        actual = files.sha256(key)
    except CacheError as error:
        return str(error)
    if checksum is None:
        return None if actual is None else f"unexpected file: {key} (recorded as never written)"
    if actual is None:
        return f"missing file: {key}"
    if actual != checksum:
        return f"checksum mismatch: {key} (expected {checksum[:16]}…, found {actual[:16]}…)"
    return None


def non_finite_values(files: CacheFiles) -> list[str]:
    """One problem per float array holding NaN or inf, naming the first example it reaches.

    A cache made before extraction checked its teacher (or from a teacher whose weights overflow)
    has intact checksums over wrong numbers; training on them gives a NaN loss much later.
    """
    layout = Manifest.read(files).layout
    root = zarr.open_group(files.zarr_store(read_only=True), mode="r", zarr_format=3)
    shard_tokens = layout.shard_tokens
    token_rows = layout.groups * shard_tokens
    problems = []
    for key, array in sorted(root.members(max_depth=None)):
        if not isinstance(array, zarr.Array):
            continue
        bf16 = array.attrs.get("pkt_dtype") == "bfloat16"
        if not (bf16 or np.issubdtype(array.dtype, np.floating)):
            continue
        token_major = key.split("/")[0] in TOKEN_MAJOR and array.ndim >= 1 and array.shape[0] == token_rows
        step = shard_tokens if token_major else max(1, array.shape[0] if array.ndim else 1)
        bad_rows, first = 0, None
        for start in range(0, array.shape[0] if array.ndim else 1, step):
            block = array[start:start + step] if array.ndim else array[...]
            bad = ~(_finite_bf16(block) if bf16 else np.isfinite(block))
            if bad.ndim > 1:
                bad = bad.reshape(bad.shape[0], -1).any(axis=1)
            rows = np.flatnonzero(np.atleast_1d(bad))
            if len(rows):
                bad_rows += len(rows)
                first = start + int(rows[0]) if first is None else first
        if first is not None:
            where = f"row {first}" + (f" (example {_example_at(files, first)!r})" if token_major else "")
            problems.append(f"non-finite values in {key}: {bad_rows} row(s), first at {where}; the teacher produced "
                            "NaN/inf, so re-extract with a teacher (dtype) that stays finite")
    return problems


def _finite_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 stored as uint16 bits: NaN and inf are the values whose exponent bits are all ones."""
    return (np.asarray(bits).view(np.uint16) & 0x7F80) != 0x7F80


def _example_at(files: CacheFiles, row: int) -> str:
    index = pq.read_table(io.BytesIO(files.read_bytes(INDEX_FILE)), columns=["example_id", "offset", "length"]).to_pydict()
    for example_id, offset, length in zip(*index.values()):
        if offset <= row < offset + length:
            return example_id
    return "none: padding"


def cache_info(path: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """A human-oriented summary of a finished cache."""
    files = CacheFiles(path, storage_options)
    if not files.exists(MANIFEST_FILE):
        raise CacheError(f"{files.url} has no {MANIFEST_FILE}: not a finished pkt cache")
    manifest = Manifest.read(files)
    counts, capture = manifest.counts, manifest.capture
    layers = list(capture.layers)
    float_rows = len(layers) * ("hidden" in capture.kinds) + sum(l >= 1 for l in layers) * ("delta" in capture.kinds)
    raw_per_token = float_rows * manifest.teacher.hidden_size * 2 + capture.top_k * 8 + 4 + 1  # + top-k, token id, mask
    for key in manifest.checksums:
        files.safe_path(key)
    sizes = {key: files.size(key) for key, checksum in manifest.checksums.items() if checksum is not None}
    stored = sum(sizes.values())
    teacher_bytes = sum(size for key, size in sizes.items() if key.startswith("teacher/"))
    token_major = ("hidden/", "delta/", "topk/", "tokens/", "supervised/", "answer/")
    activation_bytes = sum(size for key, size in sizes.items() if key.startswith(token_major))
    present = (key for key in token_major_arrays(manifest) if files.exists(f"{key}/zarr.json"))  # lazy, as in Cache
    read_path, read_reason = choose_read_path(files, present, lambda key: files.read_json(f"{key}/zarr.json"))
    return {
        "path": files.url,
        "teacher": manifest.teacher.id,
        "examples": counts.examples,
        "tokens": counts.tokens,
        "supervised_tokens": counts.supervised_tokens,
        "truncated": counts.truncated,
        "layers": layers,
        "kinds": list(capture.kinds),
        "top_k": capture.top_k,
        "storage_dtype": capture.storage_dtype,
        "topk_codec": capture.topk_codec or "exact",
        "layers_rule": manifest.layers_rule,
        "compressor": f"{capture.compressor}-{capture.compression_level}",
        "stored_bytes": stored,
        "activation_bytes": activation_bytes,
        "teacher_weight_bytes": teacher_bytes,
        "extras": {name: sum(size for key, size in sizes.items() if key.startswith(f"extras/{name}/"))
                   for name in manifest.extras},
        "bytes_per_token": activation_bytes / max(counts.tokens, 1),
        "compression_ratio": raw_per_token * counts.tokens / max(activation_bytes, 1),
        "groups": manifest.layout.groups,
        "ledger_entries": len(files.listdir(LEDGER_DIR)),
        "read_path": read_path,
        "read_path_reason": read_reason,
    }
