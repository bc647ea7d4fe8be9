"""Read a finished activation cache, from a notebook or from stage two.

    cache = open_cache("cache/qwen1.5b-mmlu")            # or "s3://bucket/cache", "memory://..."
    cache.manifest.teacher.id, cache.index.num_rows
    cache.hidden(12, "professional_law_124")            # torch [T, D] in the stored dtype
    cache.topk("professional_law_124")                  # (log-probs [T, k] float32, token ids [T, k] int64)

Float data comes back as torch tensors (bf16 has no numpy dtype); token ids and masks as
numpy arrays. Rows are found by example id through the index, never by position.

An uncompressed cache on local disk is read as memory-mapped views of its shard files (`mmap.py`);
any other through zarr. `cache.read_path` says which; `open_cache(..., read_path="zarr")` forces zarr.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from ..residual import residual_delta
from .codecs import decode_topk
from .layout import (ATTRIBUTION_KEYS, FINAL_LAYER_RAW, INDEX_FILE, MANIFEST_FILE, CacheError, Manifest, decode, delta_key,
                     hidden_key)
from .mmap import READ_PATHS, MappedArray, ReadPath, choose_read_path, shard_layout
from .store import CacheFiles, shard_file
from .verify import TOKEN_MAJOR, file_problem, token_major_arrays


def open_cache(path: str | os.PathLike, storage_options: dict | None = None,
               read_path: ReadPath = "auto") -> "Cache":
    """Open a complete cache at a local path or fsspec URL; refuse an incomplete one.

    `read_path`: `auto` maps an uncompressed local cache and reads any other through zarr; `mmap`
    refuses a cache that cannot be mapped, saying why; `zarr` always decodes through zarr.
    """
    if read_path not in READ_PATHS:
        raise ValueError(f"read_path must be one of {READ_PATHS}, got {read_path!r}")
    files = CacheFiles(path, storage_options)
    if not files.exists():
        raise CacheError(f"no cache at {files.url}")
    if not files.exists(MANIFEST_FILE):
        raise CacheError(f"{files.url} is not a complete pkt cache (no {MANIFEST_FILE}); rerun `pkt extract` to finish it")
    return Cache(files, read_path)


class Cache:
    """A finished cache. Every file is checked against the manifest's checksum the first time it is
    read through this object, so damaged or missing data is refused, never trained on."""

    def __init__(self, files: CacheFiles, read_path: ReadPath = "auto"):
        self.files = files
        self._requested_read_path = read_path
        self._mapped: dict[str, MappedArray] = {}
        self.manifest: Manifest = Manifest.read(files)
        self.root = zarr.open_group(files.zarr_store(read_only=True), mode="r", zarr_format=3)
        self.storage_dtype: str = self.manifest.capture.storage_dtype
        """The activation codec (`codecs.py`): every reader decodes through it, to the same [T, D] tensors."""
        self.topk_codec: str = self.manifest.capture.topk_codec or "exact"
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

    @cached_property
    def _read_choice(self) -> tuple[str, str]:
        if self._requested_read_path == "zarr":
            return "zarr", "asked for (read_path='zarr')"
        # Only arrays the store holds: an older cache lacks some (the answer mask) and reads on without them.
        # Lazy, so a remote cache is never asked: its answer comes before any array is looked at.
        present = (key for key in token_major_arrays(self.manifest) if key in self.root)
        chosen, why = choose_read_path(self.files, present, self._metadata)
        if self._requested_read_path == "mmap" and chosen != "mmap":
            raise CacheError(f"the cache at {self.files.url} cannot be memory-mapped: {why}; open it with "
                             "read_path='auto' or 'zarr'")
        return chosen, why

    @property
    def read_path(self) -> str:
        """`mmap` (views of the mapped shard files) or `zarr` (decoding reads) for the token-major arrays."""
        return self._read_choice[0]

    @property
    def read_path_reason(self) -> str:
        return self._read_choice[1]

    def _metadata(self, key: str) -> dict:
        self.verify_file(f"{key}/zarr.json")
        return self.files.read_json(f"{key}/zarr.json")

    def _mapped_array(self, key: str) -> MappedArray:
        mapped = self._mapped.get(key)
        if mapped is None:
            layout = shard_layout(key, self._metadata(key))
            if isinstance(layout, str):  # the choice covers every token-major array: only a foreign key lands here
                raise CacheError(f"{key} of the cache at {self.files.url} cannot be memory-mapped: {layout}")
            mapped = self._mapped[key] = MappedArray(key, layout)
        return mapped

    def _group_rows(self, key: str, group: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of token-major array `key`, inside group `group`, its shard verified first.

        On the mmap path a read-only view of the mapped shard (the caller copies what it keeps); on the
        zarr path a decoded array of its own.
        """
        if self.read_path == "zarr":
            return self._shard(key, group)[start:stop]
        mapped = self._mapped_array(key)
        shard = shard_file(key, mapped.ndim, group)
        self.verify_file(shard)
        path = None if self.manifest.checksums[shard] is None else self.files.safe_path(shard)
        return mapped.rows(path, group, start, stop)

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
        rows = self._group_rows(key, start // self.manifest.layout.shard_tokens, start, stop)
        return np.array(rows) if self.read_path == "mmap" else rows  # an array of its own, never a view of the file

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

        On the mmap path (`read_path`) the arrays are read-only views of the mapped shard files.

        Streaming whole groups is how to read fast: one call decodes a shard's chunks
        together, where a call per example pays zarr's per-call cost each time.

        Decompression releases the GIL, so reading the layers of a group side by side keeps the
        disk and the cores busy together; one array at a time leaves both idle in turn.
        """
        start, stop = self._group_span(group)
        if workers <= 1 or len(keys) == 1:
            return {key: self._group_rows(key, group, start, stop) for key in keys}, start
        with ThreadPoolExecutor(min(workers, len(keys))) as pool:  # hashing releases the GIL too
            arrays = pool.map(lambda key: self._group_rows(key, group, start, stop), keys)
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
        return decode_topk(self._rows_of("topk/logprobs", example_id), self._rows_of("topk/indices", example_id),
                           self.topk_codec)

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
        head, norm = self._whole("teacher/lm_head"), self._whole("teacher/final_norm")
        return {  # stored dense whatever the activation codec (`codecs.dense_dtype`)
            "lm_head": decode(head[...], head.attrs.get("pkt_dtype", self.storage_dtype)),
            "final_norm": decode(norm[...], norm.attrs.get("pkt_dtype", self.storage_dtype)),
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

    def require_cross_tokenizer(self, who: str) -> None:
        """Refuse, naming what is missing, a cache that cannot serve a student with another tokenizer (`who` needs it)."""
        if self.manifest.cross_tokenizer is None:
            raise CacheError(
                f"{who} needs a cache that records what a student with another tokenizer needs (each teacher token's "
                f"character span, each example's source text and the teacher's tokenizer files); the cache at "
                f"{self.files.url} predates them (its manifest has no `cross_tokenizer`). Re-extract it with this pkt "
                "(`pkt extract --overwrite` and the same settings)")

    def require_target_logprob(self, who: str) -> None:
        """Refuse, naming what is missing, a cache without the teacher's log-prob of each next token in the text."""
        self.require_cross_tokenizer(who)
        if self.manifest.cross_tokenizer.target_logprob is None:
            raise CacheError(
                f"{who} needs the teacher's log-prob of each token actually in the text (`target_logprob`, which the "
                f"top-k does not always hold); the cache at {self.files.url} predates it (its manifest's "
                "`cross_tokenizer` has no `target_logprob`). Re-extract it with this pkt (`pkt extract --overwrite` "
                "and the same settings)")

    def target_logprob(self, example_id: str) -> np.ndarray:
        """[T] float32: log p_teacher(token t+1 | tokens <= t) at each position t; 0 at the last, which has none."""
        self.require_target_logprob("reading the teacher's next-token log-probs")
        return np.asarray(self._rows_of(self.manifest.cross_tokenizer.target_logprob, example_id), dtype=np.float32)

    def spans(self, example_id: str) -> np.ndarray:
        """[T, 2] int32: each teacher token's character span [start, end) in the example's `source` text."""
        self.require_cross_tokenizer("reading token spans")
        return np.asarray(self._rows_of(self.manifest.cross_tokenizer.spans, example_id), dtype=np.int32)

    @cached_property
    def _sources(self) -> dict[str, tuple[str, str]]:
        columns = self.index.select(["example_id", *self.manifest.cross_tokenizer.source_columns]).to_pydict()
        return {i: (m, t) for i, m, t in zip(columns["example_id"], columns["messages"], columns["text"])}

    def source(self, example_id: str) -> tuple[list[dict], str]:
        """(the example's chat messages, the text the teacher tokenised): what a student with another tokenizer
        renders with its own template, and the text the cached `spans` index."""
        self.require_cross_tokenizer("reading example sources")
        self._row(example_id)
        messages, text = self._sources[example_id]
        return json.loads(messages), text

    def teacher_tokenizer(self):
        """The teacher's tokenizer (chat template included) from the files the cache holds, each checked against
        its checksum: stage two decodes teacher ids and re-renders the teacher's text without the teacher."""
        from transformers import AutoTokenizer

        self.require_cross_tokenizer("the teacher's tokenizer")
        folder = self.manifest.cross_tokenizer.tokenizer_dir
        names = sorted(key for key in self.manifest.checksums if key.startswith(f"{folder}/"))
        if not names:
            raise CacheError(f"the cache at {self.files.url} holds no teacher tokenizer files under {folder}/: "
                             "re-extract it with `pkt extract --overwrite`")
        with tempfile.TemporaryDirectory(prefix="pkt-teacher-tokenizer-") as local:
            for key in names:
                self.verify_file(key)
                Path(local, key[len(folder) + 1:]).write_bytes(self.files.read_bytes(key))
            return AutoTokenizer.from_pretrained(local)

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
