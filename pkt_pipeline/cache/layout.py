"""The on-disk layout of an activation cache: what is stored where, and in which encoding.

A cache is one zarr v3 group. Every per-token array is token-major and ragged: the tokens of
all examples are laid end to end along axis 0. Examples are packed into *groups* that each
fill one zarr shard (`shard_tokens` rows, zero-padded at the end), so a writer always writes
whole shards and two writers never touch the same file. The index table (parquet) maps each
example id to its rows.

    <cache>/run.json                       identity of the run: teacher, data, settings (written first)
    <cache>/zarr.json                      zarr group; attribute pkt_format
    <cache>/index.parquet                  example_id, content_hash, offset, length, group, ...
                                           (written last when the layout is made: the layout is whole)
    <cache>/writer.lock                    while a writer runs: its pid and host (`store.WriterLock`)
    <cache>/ledger/group-000042.json       one per finished group, with its shard checksums
    <cache>/tokens, supervised, answer     int32 / bool / bool     [N]  (answer: the reply tokens)
    <cache>/hidden/NN, delta/NN            bf16 bits (uint16) or fp16 [N, D], NN = layer (h_L pre-norm)
    <cache>/topk/logprobs, topk/indices    float32 / int32         [N, k]
    <cache>/attribution/scores             float64                 [L+1]  grad x output h_l
    <cache>/attribution/contribution       float64                 [L+1]  grad x contribution delta_l
    <cache>/teacher/lm_head, final_norm    storage dtype           [V, D], [D]
    <cache>/manifest.json                  written last: its presence means the cache is complete
"""

from __future__ import annotations

import numpy as np
import torch
import zarr.codecs as zc

FORMAT_NAME = "pkt-activation-cache"
FORMAT_VERSION = 1

RUN_FILE = "run.json"
INDEX_FILE = "index.parquet"
MANIFEST_FILE = "manifest.json"
LEDGER_DIR = "ledger"
LOCK_FILE = "writer.lock"
ZARR_GROUP_FILE = "zarr.json"
PARTIAL = ".partial"
"""Infix of a file being written (`<key>.partial-<pid>`), renamed into place when whole."""

TOP_LEVEL_ENTRIES = frozenset({
    RUN_FILE, ZARR_GROUP_FILE, INDEX_FILE, MANIFEST_FILE, LEDGER_DIR, LOCK_FILE,
    "tokens", "supervised", "answer", "hidden", "delta", "topk", "attribution", "teacher", "extras",
})
"""Every name pkt writes at the top of a cache folder: anything else there is someone else's."""


def is_layout_entry(name: str) -> bool:
    """Whether a top-level name in a cache folder is one pkt writes (or a write of one cut short)."""
    return name.split(PARTIAL, 1)[0] in TOP_LEVEL_ENTRIES

FINAL_LAYER_RAW = "raw"
"""`capture.final_layer` of a cache whose h_L is the last decoder layer's raw output (`pkt_pipeline.residual`).
Caches written before the key existed hold h_L after the final norm; their last layer is refused."""

ATTRIBUTION_KEYS = {"output": "attribution/scores", "contribution": "attribution/contribution"}
"""The attribution array of each target (`pkt_pipeline.attribution`)."""

STORAGE_DTYPES = ("bfloat16", "float16")
COMPRESSORS = ("zstd", "blosc-lz4", "blosc-zstd", "none")


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, corrupt or not the one asked for."""


def hidden_key(layer: int) -> str:
    return f"hidden/{layer:02d}"


def delta_key(layer: int) -> str:
    return f"delta/{layer:02d}"


def ledger_key(group: int) -> str:
    return f"{LEDGER_DIR}/group-{group:06d}.json"


def plan_groups(lengths: list[int], shard_tokens: int) -> list[list[int]]:
    """Pack examples, in order, into groups of at most `shard_tokens` tokens each."""
    if not lengths:
        raise CacheError("nothing to cache: the dataset has no examples")
    too_long = max(lengths)
    if too_long > shard_tokens:
        raise CacheError(f"an example of {too_long} tokens does not fit a shard of {shard_tokens}; raise shard_tokens")
    groups: list[list[int]] = [[]]
    used = 0
    for index, length in enumerate(lengths):
        if used + length > shard_tokens:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return groups


def assign_offsets(groups: list[list[int]], lengths: list[int], shard_tokens: int) -> tuple[list[int], list[int]]:
    """(first row, group) of every example: group g starts at row g * shard_tokens."""
    offsets, group_of = [0] * len(lengths), [0] * len(lengths)
    for g, members in enumerate(groups):
        cursor = g * shard_tokens
        for i in members:
            offsets[i], group_of[i] = cursor, g
            cursor += lengths[i]
    return offsets, group_of


def compressor(name: str, level: int):
    """The zarr codec for `name`; bf16 bits compress best with a byte shuffle (exponent bytes align)."""
    if name == "zstd":
        return zc.ZstdCodec(level=level)
    if name == "blosc-lz4":
        return zc.BloscCodec(cname="lz4", clevel=level, shuffle="shuffle")
    if name == "blosc-zstd":
        return zc.BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")
    if name == "none":
        return None
    raise CacheError(f"unknown compressor {name!r}; choose one of {COMPRESSORS}")


def encode(tensor: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """A float tensor as the numpy array the cache stores (bf16 as its raw uint16 bits)."""
    if storage_dtype == "bfloat16":
        return tensor.detach().to(torch.bfloat16).contiguous().view(torch.uint16).cpu().numpy()
    if storage_dtype == "float16":
        largest = tensor.detach().abs().max().item() if tensor.numel() else 0.0
        if largest > torch.finfo(torch.float16).max:
            raise CacheError(f"value {largest:.4g} overflows float16; store bfloat16 instead")
        return tensor.detach().to(torch.float16).cpu().numpy()
    raise CacheError(f"unknown storage dtype {storage_dtype!r}; choose one of {STORAGE_DTYPES}")


def decode(array: np.ndarray, storage_dtype: str) -> torch.Tensor:
    if storage_dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def numpy_dtype(storage_dtype: str) -> str:
    return "uint16" if storage_dtype == "bfloat16" else "float16"
