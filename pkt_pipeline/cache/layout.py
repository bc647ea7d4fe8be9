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
    <cache>/spans                          int32                   [N, 2] each token's characters [start, end)
                                           in its example's rendered text (the index's `text` column)
    <cache>/target_logprob                 float32                 [N]  the teacher's log-prob of the next token
                                           in the text (0 at an example's last token, which has none)
    <cache>/hidden/NN, delta/NN            bf16 bits (uint16) or fp16 [N, D], NN = layer (h_L pre-norm)
    <cache>/topk/logprobs, topk/indices    float32 / int32         [N, k]
    <cache>/attribution/scores             float64                 [L+1]  grad x output h_l
    <cache>/attribution/contribution       float64                 [L+1]  grad x contribution delta_l
    <cache>/teacher/lm_head, final_norm    storage dtype           [V, D], [D]
    <cache>/tokenizer/                     the teacher's tokenizer files (tokenizer.json, tokenizer_config.json
                                           with its chat template, ...), as `save_pretrained` writes them
    <cache>/manifest.json                  written last: its presence means the cache is complete

`run_record` builds run.json and `build_manifest` the manifest: both are composed here, so the
contract between the stages is written down in one place; `Manifest` is how a reader sees it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import zarr.codecs as zc

from .codecs import (ACTIVATION_CODECS, LOSSY_ACTIVATION_CODECS, decode_rows, encode_rows,
                     row_format, topk_formats)
from .errors import CacheError

if TYPE_CHECKING:
    from .store import CacheFiles

FORMAT_NAME = "pkt-activation-cache"
FORMAT_VERSION = 2
"""The newest format this pkt reads. A cache is written as version 1 unless it needs 2 (`format_version_of`)."""

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
    "spans", "tokenizer", "target_logprob",
})
"""Every name pkt writes at the top of a cache folder: anything else there is someone else's."""


def is_layout_entry(name: str) -> bool:
    """Whether a top-level name in a cache folder is one pkt writes (or a write of one cut short)."""
    return name.split(PARTIAL, 1)[0] in TOP_LEVEL_ENTRIES

FINAL_LAYER_RAW = "raw"
"""`capture.final_layer` of a cache whose h_L is the last decoder layer's raw output (`pkt_pipeline.residual`).
Caches written before the key existed hold h_L after the final norm; their last layer is refused."""

TOKENIZER_DIR = "tokenizer"
"""Where the teacher's tokenizer files live in a cache (see `CrossTokenizerInfo`)."""
SOURCE_COLUMNS = ("messages", "text")
"""Index columns of the source of each example: its messages (canonical JSON) and the text the teacher tokenised."""

ATTRIBUTION_KEYS = {"output": "attribution/scores", "contribution": "attribution/contribution"}
"""The attribution array of each target (`pkt_pipeline.attribution`)."""

STORAGE_DTYPES = ACTIVATION_CODECS
"""`extract.storage_dtype`: how the per-token float rows are stored (`codecs.py`)."""
COMPRESSORS = ("zstd", "blosc-lz4", "blosc-zstd", "none")


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
    """A float tensor as the numpy array the cache stores under activation codec `storage_dtype` (`codecs.py`)."""
    return encode_rows(tensor, storage_dtype)


def decode(array: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """Stored rows back as a float tensor (bf16 for bf16 and the lossy codecs), whatever the codec."""
    return decode_rows(array, storage_dtype)


@dataclass(frozen=True)
class CaptureSettings:
    """What a cache captures of the teacher per token (`pkt extract`'s capture settings)."""

    layers: tuple[int, ...]
    kinds: tuple[str, ...]  # "hidden" and/or "delta"
    top_k: int
    storage_dtype: str
    topk_codec: str = "exact"


@dataclass(frozen=True)
class ArraySpec:
    """A token-major array: `row_shape` is the shape of one token's row."""

    key: str
    row_shape: tuple[int, ...]
    dtype: str
    attributes: dict = field(default_factory=dict)


def array_specs(settings: CaptureSettings, width: int) -> list[ArraySpec]:
    """The token-major arrays a cache of these capture settings holds."""
    row_shape, float_type = row_format(settings.storage_dtype, width)
    attrs = {"pkt_dtype": settings.storage_dtype}
    specs = [ArraySpec("tokens", (), "int32"), ArraySpec("supervised", (), "bool"), ArraySpec("answer", (), "bool"),
             ArraySpec("spans", (2,), "int32"), ArraySpec("target_logprob", (), "float32")]
    for layer in settings.layers:
        if "hidden" in settings.kinds:
            specs.append(ArraySpec(hidden_key(layer), row_shape, float_type, attrs))
        if "delta" in settings.kinds and layer >= 1:
            specs.append(ArraySpec(delta_key(layer), row_shape, float_type, attrs))
    (values_shape, values_type), (ids_shape, ids_type) = topk_formats(settings.topk_codec, settings.top_k)
    topk_attrs = {} if settings.topk_codec == "exact" else {"pkt_codec": settings.topk_codec}
    specs += [ArraySpec("topk/logprobs", values_shape, values_type, topk_attrs),
              ArraySpec("topk/indices", ids_shape, ids_type, topk_attrs)]
    return specs


# The manifest, typed. Every manifest pkt has written reads back and writes back the same JSON:
# keys added over time are optional (absent in older caches, and left absent when written back);
# keys a newer writer of the same format version added are kept in `other`, so nothing is lost;
# a newer format version is refused. Free-form records (the identity compared as a whole, an
# extra's provenance, the checksums) stay plain dicts.

class ManifestError(ValueError):
    """A manifest key that is missing or of the wrong type; `Manifest.from_json` names the file."""


_Self = TypeVar("_Self", bound="_Record")


@dataclass(frozen=True)
class _Record:
    other: dict = field(default_factory=dict, kw_only=True)
    """Keys this pkt does not know, as they were read."""
    absent: frozenset = field(default=frozenset(), kw_only=True, repr=False, compare=False)
    """Optional keys the record did not have: written back as absent, not as their default (not compared:
    two records of the same values are equal whoever wrote them)."""

    @classmethod
    def from_json(cls: type[_Self], data: Any, where: str = "") -> _Self:
        _expect(isinstance(data, dict), where, "an object", data)
        hints = typing.get_type_hints(cls)
        values, absent = {}, set()
        own = [f for f in fields(cls) if f.name not in ("other", "absent")]
        for f in own:
            key = f"{where}.{f.name}" if where else f.name
            if f.name in data:
                values[f.name] = _read(hints[f.name], data[f.name], key)
            elif f.default is MISSING and f.default_factory is MISSING:
                raise ManifestError(f"key {key!r} is missing")
            else:
                absent.add(f.name)
        names = {f.name for f in own}
        return cls(**values, other={k: v for k, v in data.items() if k not in names}, absent=frozenset(absent))

    def to_json(self) -> dict:
        record = {f.name: _write(getattr(self, f.name)) for f in fields(self)
                  if f.name not in ("other", "absent") and f.name not in self.absent}
        return {**record, **self.other}


def _expect(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ManifestError(f"key {key!r} should be {what}, not {shown}" if key else
                            f"it should be {what}, not {shown}")


def _read(hint: Any, value: Any, key: str) -> Any:
    """`value` as type `hint`, checked: lists become tuples, objects become records."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _read(inner, value, key)
    if isinstance(hint, type) and hasattr(hint, "from_json"):
        return hint.from_json(value, key)
    if origin is tuple:
        _expect(isinstance(value, list), key, "a list", value)
        return tuple(_read(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is dict or origin is dict:
        _expect(isinstance(value, dict), key, "an object", value)
        return {name: _read(args[1], item, f"{key}.{name}") for name, item in value.items()} if args else value
    if hint is bool:
        _expect(isinstance(value, bool), key, "true or false", value)
    elif hint is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
    elif hint is str:
        _expect(isinstance(value, str), key, "a string", value)
    return value


def _write(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, tuple):
        return [_write(item) for item in value]
    if isinstance(value, dict):
        return {name: _write(item) for name, item in value.items()}
    return value


@dataclass(frozen=True)
class TeacherInfo(_Record):
    id: str
    weights_sha256: str
    dtype: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    architecture: str


@dataclass(frozen=True)
class TokenizerInfo(_Record):
    sha256: str
    """Of the token <-> id mapping and the chat template."""
    vocab_size: int
    vocabulary_sha256: str | None = None
    """Of the mapping alone: what a student must share (caches of the first days lack it)."""


@dataclass(frozen=True)
class Capture(_Record):
    layers: tuple[int, ...]
    kinds: tuple[str, ...]
    top_k: int
    storage_dtype: str
    compressor: str
    compression_level: int
    final_layer: str | None = None
    """`FINAL_LAYER_RAW`, or None for a cache whose h_L is after the final norm (it predates the key)."""
    topk_codec: str | None = None
    """How the top-k is stored (`codecs.TOPK_CODECS`); None: `exact` (caches before the key)."""

    @property
    def settings(self) -> CaptureSettings:
        return CaptureSettings(self.layers, self.kinds, self.top_k, self.storage_dtype, self.topk_codec or "exact")


def format_version_of(capture: Mapping) -> int:
    """The format version a cache of these capture settings is written as: 2 when it uses a lossy codec
    (a pkt that reads version 1 only would take its uint8 rows for something else), else 1, so a cache
    an older pkt can read stays readable by it."""
    lossy = capture.get("storage_dtype") in LOSSY_ACTIVATION_CODECS or capture.get("topk_codec", "exact") != "exact"
    return 2 if lossy else 1


@dataclass(frozen=True)
class Prompt(_Record):
    format: str
    max_length: int
    train_on_inputs: bool


@dataclass(frozen=True)
class Layout(_Record):
    chunk_tokens: int
    shard_tokens: int
    groups: int


@dataclass(frozen=True)
class DatasetInfo(_Record):
    path: str
    fingerprint: str


@dataclass(frozen=True)
class Counts(_Record):
    examples: int
    tokens: int
    supervised_tokens: int
    truncated: int


@dataclass(frozen=True)
class AttributionSource(_Record):
    """What the attribution scores were computed from (part of the identity)."""

    data: str
    aggregation: str
    limit: int


@dataclass(frozen=True)
class AttributionSummary(_Record):
    """How the stored attribution scores were aggregated, over how many examples."""

    aggregation: str
    examples: int


@dataclass(frozen=True)
class ExtraEntry:
    """A teacher extra's record (`pkt extract --with NAME`): what it chose, from what data, made from which inputs."""

    provenance: dict

    @property
    def inputs(self) -> dict | None:
        """The settings the extra was made from; None for an extra made before they were recorded."""
        return self.provenance.get("inputs")

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> "ExtraEntry":
        _expect(isinstance(data, dict), where, "an object", data)
        return cls(dict(data))

    def to_json(self) -> dict:
        return dict(self.provenance)


@dataclass(frozen=True)
class CrossTokenizerInfo(_Record):
    """What a cache holds for a student with another tokenizer (`pkt_pipeline.xtok`): absent from caches
    written before it, which then serve same-vocabulary methods only."""

    spans: str
    """The token-major array of each teacher token's character span in its example's text."""
    source_columns: tuple[str, ...]
    """Index columns with each example's source: `messages` (its canonical JSON) and the rendered `text`."""
    tokenizer_dir: str
    """The folder of the teacher's tokenizer files (`save_pretrained`'s), chat template included."""
    target_logprob: str | None = None
    """The token-major array of the teacher's log-prob of each token actually in the text, at the position that
    predicts it (what `alm` sums over a chunk; the top-k need not hold it). None in caches written before it."""


CROSS_TOKENIZER = CrossTokenizerInfo(spans="spans", source_columns=SOURCE_COLUMNS, tokenizer_dir=TOKENIZER_DIR,
                                     target_logprob="target_logprob")
"""The record every cache of this pkt carries."""


@dataclass(frozen=True)
class Manifest(_Record):
    """`manifest.json`, the record of a finished cache: what it holds, from what, and each file's sha256."""

    format: str
    format_version: int
    pkt_version: str
    identity: dict
    """What decides the cache's content (teacher, data, settings), compared whole to decide a rerun."""
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    capture: Capture
    prompt: Prompt
    layout: Layout
    dataset: DatasetInfo
    counts: Counts
    attribution: AttributionSummary
    stored_bytes: int
    checksums: dict[str, str | None]
    """sha256 of every file; None for a shard never written (all fill value)."""
    extras: dict[str, ExtraEntry] = field(default_factory=dict)
    layers_rule: dict | None = None
    """How `extract.layers: auto` derived `capture.layers` (the methods' rules, the student's depth); None when
    the layers were listed (or all). Not part of the identity: the layers it gave are."""
    cross_tokenizer: CrossTokenizerInfo | None = None
    """None for a cache written before it was stored: no student with another tokenizer can use it."""

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> "Manifest":
        """Read a manifest; `where` names it (the file) in a refusal. Raises CacheError."""
        source = where or MANIFEST_FILE
        if isinstance(data, dict) and data.get("format") not in (None, FORMAT_NAME):
            raise CacheError(f"{source} is not a pkt cache manifest (its format is {data.get('format')!r}, "
                             f"not {FORMAT_NAME!r})")
        version = data.get("format_version") if isinstance(data, dict) else None
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise CacheError(f"{source} is format version {version} of {FORMAT_NAME}; this pkt reads version "
                             f"{FORMAT_VERSION}: upgrade pkt to read it")
        try:
            return super().from_json(data, "")
        except ManifestError as exc:
            raise CacheError(f"{source} is not a valid pkt manifest: {exc}; delete it and rerun the same "
                             "`pkt extract` command to write it again") from None

    @classmethod
    def read(cls, files: "CacheFiles") -> "Manifest":
        """The manifest of the cache in `files`."""
        return cls.from_json(files.read_json(MANIFEST_FILE), files.where(MANIFEST_FILE))


def run_record(version: str, teacher: TeacherInfo, tokenizer: TokenizerInfo, capture: Capture, prompt: Prompt,
               layout: Layout, dataset: DatasetInfo, counts: Counts, attribution: AttributionSource,
               layers_rule: dict | None = None, cross_tokenizer: CrossTokenizerInfo = CROSS_TOKENIZER) -> dict:
    """run.json: the cache's identity (what decides its content) and the records its manifest repeats.

    `cross_tokenizer` is part of the identity: a cache written without it has another layout (no `spans`),
    so a rerun over one is refused as another cache rather than resumed into arrays it lacks."""
    identity = {"teacher": teacher.id, "teacher_weights_sha256": teacher.weights_sha256,
                "tokenizer_sha256": tokenizer.sha256, "dataset_fingerprint": dataset.fingerprint,
                "capture": capture.to_json(), "prompt": prompt.to_json(), "layout": layout.to_json(),
                "attribution": attribution.to_json(), "cross_tokenizer": cross_tokenizer.to_json()}
    return {"identity": identity, "pkt_version": version, "teacher": teacher.to_json(),
            "tokenizer": tokenizer.to_json(), "capture": capture.to_json(), "prompt": prompt.to_json(),
            "layout": layout.to_json(), "dataset": dataset.to_json(), "counts": counts.to_json(),
            "cross_tokenizer": cross_tokenizer.to_json(), **({"layers_rule": layers_rule} if layers_rule else {})}


def build_manifest(run: dict, attribution: AttributionSummary, extras: Mapping[str, ExtraEntry], stored_bytes: int,
                   checksums: Mapping[str, str | None], where: str = "") -> Manifest:
    """The manifest of a finished cache: its run record, what stage one added after the groups, every file's sha256."""
    return Manifest.from_json({
        "format": FORMAT_NAME, "format_version": format_version_of(run["capture"]), **run,
        "attribution": attribution.to_json(), "extras": {name: entry.to_json() for name, entry in extras.items()},
        "stored_bytes": stored_bytes, "checksums": dict(sorted(checksums.items())),
    }, where)
