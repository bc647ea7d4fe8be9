"""Read a finished activation cache, from a notebook or from stage two.

    cache = open_cache("cache/qwen1.5b-mmlu")            # or "s3://bucket/cache", "memory://..."
    cache.manifest.teacher.id, cache.index.num_rows
    cache.hidden(12, "professional_law_124")            # torch [T, D] in the stored dtype
    cache.topk("professional_law_124")                  # (log-probs [T, k] float32, token ids [T, k] int64)

Float data comes back as torch tensors (bf16 has no numpy dtype); token ids and masks as
numpy arrays. Rows are found by example id through the index, never by position.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from ..residual import residual_delta
from .layout import (ATTRIBUTION_KEYS, FINAL_LAYER_RAW, INDEX_FILE, MANIFEST_FILE, CacheError, Manifest, decode, delta_key,
                     hidden_key)
from .store import CacheFiles, shard_file
from .verify import TOKEN_MAJOR, file_problem


def open_cache(path: str | os.PathLike, storage_options: dict | None = None) -> "Cache":
    """Open a complete cache at a local path or fsspec URL; refuse an incomplete one."""
    files = CacheFiles(path, storage_options)
    if not files.exists():
        raise CacheError(f"no cache at {files.url}")
    if not files.exists(MANIFEST_FILE):
        raise CacheError(f"{files.url} is not a complete pkt cache (no {MANIFEST_FILE}); rerun `pkt extract` to finish it")
    return Cache(files)


class Cache:
    """A finished cache. Every file is checked against the manifest's checksum the first time it is
    read through this object, so damaged or missing data is refused, never trained on."""

    def __init__(self, files: CacheFiles):
        self.files = files
        self.manifest: Manifest = Manifest.read(files)
        self.root = zarr.open_group(files.zarr_store(read_only=True), mode="r", zarr_format=3)
        self.storage_dtype: str = self.manifest.capture.storage_dtype
        self._verified: set[str] = set()
        self._verifying: dict[str, threading.Lock] = {}
        self._verify_guard = threading.Lock()

    def verify_file(self, key: str) -> None:
        """Refuse `key` unless it matches the manifest's checksum; each file is hashed once per Cache."""
        if key in self._verified:
            return
        with self._verify_guard:
            lock = self._verifying.setdefault(key, threading.Lock())
        with lock:  # another reader thread hashing the same file: wait for its verdict
            if key in self._verified:
                return
            checksums = self.manifest.checksums
            problem = (file_problem(self.files, key, checksums[key]) if key in checksums
                       else f"{key} is not in the manifest's checksums")
            if problem:
                raise CacheError(self._refusal(key, problem))
            self._verified.add(key)

    def _refusal(self, key: str, problem: str) -> str:
        if key.split("/")[0] in TOKEN_MAJOR and "/c/" in key:  # a group shard: a rerun rewrites it in place
            advice = ("rerun `pkt extract` with the same settings and --out: it re-extracts the examples of "
                      "every damaged shard")
        else:
            advice = "re-extract the cache (`pkt extract --overwrite` with the same settings)"
        return (f"the cache at {self.files.url} is damaged: {problem}. {advice}; `pkt cache verify "
                f"{self.files.url}` lists every damaged file")

    def _array(self, key: str) -> zarr.Array:
        self.verify_file(f"{key}/zarr.json")
        return self.root[key]

    def _shard(self, key: str, group: int) -> zarr.Array:
        """Array `key`, its group `group` shard verified."""
        array = self._array(key)
        self.verify_file(shard_file(key, array.ndim, group))
        return array

    def _rows_of(self, key: str, example_id: str) -> np.ndarray:
        start, stop = self.span(example_id)
        return self._shard(key, start // self.manifest.layout.shard_tokens)[start:stop]

    def _whole(self, key: str) -> zarr.Array:
        """A small array that is not token-major, every file of it verified."""
        array = self._array(key)
        for name in self.manifest.checksums:
            if name.startswith(f"{key}/"):
                self.verify_file(name)
        return array

    @cached_property
    def index(self) -> pa.Table:
        self.verify_file(INDEX_FILE)
        return pq.read_table(io.BytesIO(self.files.read_bytes(INDEX_FILE)))

    @cached_property
    def _rows(self) -> dict[str, tuple[int, int, str]]:
        columns = self.index.select(["example_id", "offset", "length", "content_hash"]).to_pydict()
        return {i: (o, o + n, h) for i, o, n, h in zip(*columns.values())}

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.capture.layers)

    def span(self, example_id: str) -> tuple[int, int]:
        """Rows [start, stop) of one example in every token-major array."""
        return self._row(example_id)[:2]

    def content_hash(self, example_id: str) -> str:
        """sha256 of the example's messages: stage two matches its data to the cache by id and this."""
        return self._row(example_id)[2]

    def _row(self, example_id: str) -> tuple[int, int, str]:
        try:
            return self._rows[example_id]
        except KeyError:
            raise KeyError(f"example {example_id!r} is not in the cache at {self.files.url}") from None

    def group_examples(self, group: int) -> list[str]:
        """Ids of the examples stored in one group (one zarr shard), in row order."""
        return self._examples_by_group.get(group, [])

    @cached_property
    def _examples_by_group(self) -> dict[int, list[str]]:
        by_group: dict[int, list[str]] = {}
        columns = self.index.select(["example_id", "group", "offset"]).to_pydict()
        for example_id, group, _ in sorted(zip(*columns.values()), key=lambda row: row[2]):
            by_group.setdefault(group, []).append(example_id)
        return by_group

    def read_group(self, keys: list[str], group: int, workers: int = 4) -> tuple[dict[str, np.ndarray], int]:
        """All used rows of one group of each array in `keys`, read on `workers` threads, and the group's first row.

        Streaming whole groups is how to read fast: one call decodes a shard's chunks
        together, where a call per example pays zarr's per-call cost each time.

        Decompression releases the GIL, so reading the layers of a group side by side keeps the
        disk and the cores busy together; one array at a time leaves both idle in turn.
        """
        start, stop = self._group_span(group)
        if workers <= 1 or len(keys) == 1:
            return {key: self._shard(key, group)[start:stop] for key in keys}, start
        with ThreadPoolExecutor(min(workers, len(keys))) as pool:  # hashing releases the GIL too
            arrays = pool.map(lambda key: self._shard(key, group)[start:stop], keys)
            return dict(zip(keys, arrays)), start

    def _group_span(self, group: int) -> tuple[int, int]:
        start = group * self.manifest.layout.shard_tokens
        examples = self.group_examples(group)
        if not examples:
            raise CacheError(f"group {group} holds no examples in the cache at {self.files.url}")
        return start, max(self.span(example_id)[1] for example_id in examples)

    def tokens(self, example_id: str) -> np.ndarray:
        return self._rows_of("tokens", example_id)

    @cached_property
    def has_answer_mask(self) -> bool:
        """Whether the cache stores `answer`, the reply tokens (caches from before it did not)."""
        return "answer" in self.root

    def answer(self, example_id: str) -> np.ndarray:
        """[T] bool, the example's reply tokens whatever `train_on_inputs` made `supervised`."""
        if not self.has_answer_mask:
            raise CacheError(f"the cache at {self.files.url} holds no answer mask (it predates it): re-extract it")
        return self._rows_of("answer", example_id).astype(bool)

    def supervised(self, example_id: str) -> np.ndarray:
        return self._rows_of("supervised", example_id).astype(bool)

    def hidden(self, layer: int, example_id: str) -> torch.Tensor:
        """The residual stream `hidden_states[layer]` of one example, [T, D]."""
        self._check_layer(layer, "hidden")
        return decode(self._rows_of(hidden_key(layer), example_id), self.storage_dtype)

    def delta(self, layer: int, example_id: str) -> torch.Tensor:
        """The residual contribution h_layer - h_(layer-1), [T, D]: stored, or derived from stored layers."""
        if layer < 1:
            raise ValueError("delta is defined for layers >= 1 (layer 0 is the embedding output)")
        if "delta" in self.manifest.capture.kinds and layer in self.layers:
            self.check_final_layer(layer)
            return decode(self._rows_of(delta_key(layer), example_id), self.storage_dtype)
        if layer in self.layers and layer - 1 in self.layers:
            current = self.hidden(layer, example_id)
            return residual_delta(current, self.hidden(layer - 1, example_id)).to(current.dtype)
        raise CacheError(f"delta of layer {layer} needs layers {layer - 1} and {layer}; cached layers: {self.layers}")

    def topk(self, example_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k next-token log-probs at each position and their token ids."""
        values = torch.from_numpy(self._rows_of("topk/logprobs", example_id))
        indices = torch.from_numpy(self._rows_of("topk/indices", example_id).astype(np.int64))
        return values, indices

    def attribution(self, target: str = "output") -> np.ndarray:
        """Layer Gradient x Activation score of each teacher layer 0..L, of its output or its contribution."""
        if target not in ATTRIBUTION_KEYS:
            raise ValueError(f"attribution target must be one of {list(ATTRIBUTION_KEYS)}, got {target!r}")
        key = ATTRIBUTION_KEYS[target]
        if key not in self.root:
            raise CacheError(f"the cache at {self.files.url} holds no {target} attribution (it predates it): "
                             "re-extract it, or pair by `output` attribution or `proportional`ly")
        return self._whole(key)[...]

    def teacher_head(self) -> dict:
        """What stage two needs of the teacher without loading it: LM head and final norm."""
        head = self._whole("teacher/lm_head")
        return {
            "lm_head": decode(head[...], self.storage_dtype),
            "final_norm": decode(self._whole("teacher/final_norm")[...], self.storage_dtype),
            "norm_eps": float(head.attrs["norm_eps"]),
        }

    def extra(self, name: str) -> dict[str, np.ndarray]:
        """The arrays a method's teacher-side extra stored (`pkt extract --with NAME`); provenance
        is in `manifest.extras[name]`."""
        if name not in self.manifest.extras:
            present = ", ".join(sorted(self.manifest.extras)) or "none"
            raise CacheError(f"{self.files.url} has no {name!r} teacher extra (it has: {present}); "
                             f"add it with `pkt extract --with {name}` and the same settings")
        group = self.root[f"extras/{name}"]
        return {key: self._whole(f"extras/{name}/{key}")[...]
                for key, node in sorted(group.members(max_depth=None)) if isinstance(node, zarr.Array)}

    def _check_layer(self, layer: int, kind: str) -> None:
        if layer not in self.layers:
            raise CacheError(f"layer {layer} was not captured ({kind}); cached layers: {self.layers}")
        self.check_final_layer(layer)

    def check_final_layer(self, layer: int) -> None:
        """Refuse the last layer of a cache whose h_L is the normed final state (`residual.py`): written
        before pkt captured it raw, so its h_L and every delta of it are not the layer's output."""
        if layer == self.manifest.teacher.num_layers and self.manifest.capture.final_layer != FINAL_LAYER_RAW:
            raise CacheError(f"the cache at {self.files.url} holds the teacher's last layer ({layer}) after the final "
                             "norm, not the layer's own output (the cache predates `capture.final_layer`): "
                             "re-extract it with `pkt extract --overwrite`, or train on earlier layers")

    def __repr__(self) -> str:
        return f"<pkt cache {self.files.url}: {self.manifest.counts.examples} examples, teacher {self.manifest.teacher.id}>"
