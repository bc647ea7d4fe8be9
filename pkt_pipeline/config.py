"""One typed configuration object for every stage, loaded from YAML with CLI overrides.

A config file mirrors `PktConfig`: one section per concern. Unknown keys and values of the
wrong type are refused with the dotted key named, so a typo never silently falls back to a
default. Overrides use dotted keys (`--set assets.dtype=float32`); values are parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match `PktConfig`."""


class InvalidValue(ConfigError):
    """A section's key holds a value outside its range; `_build` adds the section's dotted prefix."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key} {reason}")
        self.key, self.reason = key, reason


@dataclass(frozen=True)
class Range:
    """The numbers a key admits. NaN never is, infinity only where it means "no limit" (`unbounded`)."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    unbounded: bool = False

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return self.unbounded and value == math.inf
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}{' (or .inf)' if self.unbounded else ''}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1, high_open=True)
"""[0, 1): a share of something that must leave some of it (warm-up, dropout, AdamW's betas)."""


class Checked:
    """Base of the config sections: each key named in `RANGES` is checked on construction (every element
    of a list key), so a bad number is refused when the config loads, not as a crash or a silently
    wrong run hours later (a negative `max_grad_norm` flips the gradient)."""

    RANGES: ClassVar[dict[str, Range]] = {}

    def __post_init__(self) -> None:
        for key, allowed in self.RANGES.items():
            value = getattr(self, key)
            for item in value if isinstance(value, list) else [value]:
                if item is not None and not isinstance(item, str) and not allowed.admits(item):  # a word: its Literal
                    raise InvalidValue(key, f"must be {allowed}, got {value!r}")
        for key, options in _choice_fields(type(self)).items():
            value = getattr(self, key)
            if value not in options:
                raise InvalidValue(key, f"must be one of {list(options)}, got {value!r}")


@functools.cache
def _choice_fields(cls: type) -> dict[str, tuple]:
    """The fields of a section typed `Literal[...]` (a fixed set of choices), with their choices."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is typing.Literal}


@dataclass
class RuntimeConfig:
    """Where and in which precision models run."""

    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: str = "auto"
    """`auto` (bf16 on a CPU that supports it and on GPUs that do, else fp16/fp32), or a torch dtype name."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust that repository."""
    device_map: str | dict[str, int | str] = ""
    """Split a model too large for one device over several (`pkt extract`'s teacher, `pkt eval`'s model), by
    accelerate: `auto`, `balanced`, `balanced_low_0`, `sequential`, or {module: GPU index, `cpu` or `disk`}.
    Empty: the whole model on `device`."""
    max_memory: dict[str, int | str] = field(default_factory=dict)
    """With `device_map`: the most each device may hold, e.g. {0: 70GiB, 1: 70GiB, cpu: 200GiB}; what fits
    nowhere is offloaded to `offload_folder`."""
    offload_folder: str = ""
    """With `device_map`: where weights that fit on no device are kept (accelerate's disk offload)."""

    def __post_init__(self) -> None:
        check_device_map(self.device_map)
        check_max_memory(self.max_memory)
        if self.max_memory and not self.device_map:
            raise InvalidValue("max_memory", "applies only with runtime.device_map (e.g. runtime.device_map=auto)")


DEVICE_MAP_PLANS = ("auto", "balanced", "balanced_low_0", "sequential")
"""The device maps accelerate plans itself from the devices' free memory (or `max_memory`)."""
_DEVICE = re.compile(r"disk|cpu|mps|(cuda|xpu|npu)(:\d+)?")
_SIZE = re.compile(r"\d+(\.\d+)?\s*(GiB|MiB|KiB|GB|MB|KB)", re.IGNORECASE)


def check_device_map(device_map: str | dict[str, int | str]) -> None:
    """Refuse a `runtime.device_map` accelerate would not read, naming the key, before any weight loads."""
    if isinstance(device_map, str):
        if device_map and device_map not in DEVICE_MAP_PLANS:
            raise InvalidValue("device_map", f"must be empty (one device), one of {list(DEVICE_MAP_PLANS)} or a "
                                             f"mapping {{module: device}}, got {device_map!r}")
        return
    if not device_map:
        raise InvalidValue("device_map", "is an empty mapping: name a device for each top module (e.g. "
                                         "{model.embed_tokens: 0, model.layers: 0, model.norm: 1, lm_head: 1}), or "
                                         "leave it empty for one device")
    for module, target in device_map.items():
        gpu = isinstance(target, int) and not isinstance(target, bool) and target >= 0
        if not gpu and not (isinstance(target, str) and _DEVICE.fullmatch(target)):
            raise InvalidValue(f"device_map.{module}", f"must be a GPU index (0, 1, ...), a device (cuda:1, cpu) or "
                                                       f"disk, got {target!r}")


def check_max_memory(max_memory: dict[str, int | str]) -> None:
    """Refuse a `runtime.max_memory` key that names no device, or a size accelerate cannot read."""
    for key, size in max_memory.items():
        if not (str(key).isdigit() or key in ("cpu", "mps", "disk")):
            raise InvalidValue(f"max_memory.{key}", "is no device: the keys are GPU indices (0, 1, ...), cpu, mps "
                                                    "or disk")
        counted = isinstance(size, int) and not isinstance(size, bool) and size >= 0
        if not counted and not (isinstance(size, str) and _SIZE.fullmatch(size.strip())):
            raise InvalidValue(f"max_memory.{key}", f"must be a size such as 70GiB or 500MB, or a number of bytes, "
                                                    f"got {size!r}")


@dataclass
class AssetsConfig:
    """The pinned real models and evaluation data that `pkt assets fetch` provides."""

    models_dir: str = "models"
    data_dir: str = "data"
    models: list[str] = field(default_factory=list)
    """Model names from the pin file; empty means every model pinned with `default: true`."""
    pins: str | None = None
    """Pin file to use instead of the one shipped with pkt."""
    dtype: str = "bfloat16"
    """Precision of the converted safetensors weights."""
    tiny: bool = False
    """Build the tiny random teacher/student pair into `models_dir/tiny/` instead (the tiny pipeline)."""


@dataclass
class ExtractConfig(Checked):
    """Stage one: what `pkt extract` runs the teacher over and what it caches."""

    RANGES = dict(attribution_examples=NON_NEGATIVE, max_length=Range(2), limit=NON_NEGATIVE, layers=NON_NEGATIVE,
                  top_k=AT_LEAST_ONE, batch_size=AT_LEAST_ONE, chunk_tokens=AT_LEAST_ONE, shard_tokens=AT_LEAST_ONE)

    data: str = "mmlu/train"
    """Examples to cache: a .jsonl of chat `messages`, or TASK/SPLIT of the transfer splits (e.g. gsm/train)."""
    attribution_data: str = ""
    """Examples for layer attribution; empty means the `extract` split of the same task (or `data` for a file)."""
    attribution_examples: int = 32
    """At most this many attribution examples (one backward pass each; a few dozen suffice); 0 means all."""
    attribution_aggregation: str = "abs"
    """`abs`: sum of |grad x activation| (default); `signed`: sum of grad x activation."""
    out: str = "cache/teacher"
    """Cache folder or fsspec URL."""
    prompt_format: str = "chat"
    """`chat`: the tokenizer's chat template; `plain`: "User: ...\nAssistant: ..." as in the papers."""
    max_length: int = 1024
    """Longer examples are truncated (counted in the manifest)."""
    train_on_inputs: bool = False
    """Supervise every token, not only the answer (the papers did for MMLU)."""
    limit: int = 0
    """Cache only the first N examples; 0 means all."""
    layers: typing.Literal["auto"] | list[int] = field(default_factory=list)
    """Teacher layers 0..L to capture (0 = embedding output); empty means all; `auto`: the layers the configured
    methods read (`align.method` and every `methods.<name>` section), by their pairing rule for the `student`'s
    depth (read from its config, not its weights), recorded in the manifest's `layers_rule`."""
    capture: list[str] = field(default_factory=lambda: ["hidden"])
    """`hidden` (the residual stream h_l) and/or `delta` (the residual contribution h_l - h_(l-1))."""
    top_k: int = 64
    """How many next-token log-probs to keep per position."""
    batch_size: int = 8
    storage_dtype: str = "bfloat16"
    """The activation codec: `bfloat16` (stored as its raw uint16 bits), `float16` (refused on overflow), or
    lossy with a scale per token: `float8_e4m3`, `int8` (half the bytes; errors in pkt_pipeline/cache/codecs.py,
    measured on the real teacher by bench/cache_fidelity.py)."""
    topk_codec: str = "exact"
    """`exact` (float32 log-probs, int32 ids: 8 B per entry) or `uint8` (8-bit log-probs, 3-byte ids:
    264 B/token at k=64)."""
    compressor: str = "zstd"
    """`zstd`, `blosc-lz4`, `blosc-zstd` or `none`; see bench/cache_io.py for what each costs."""
    compression_level: int = 3
    chunk_tokens: int = 512
    """Rows per zarr chunk, the unit of reading (~1.5 MB of bf16 at width 1536)."""
    shard_tokens: int = 8192
    """Rows per zarr shard, the unit of writing; every example must fit in one."""
    overwrite: bool = False
    """Replace a cache of another teacher, data set or settings at `out`."""
    metrics: str = ""
    """Also write the run's summary (examples, tokens, seconds, peak RSS) as JSON to this file."""
    extras: list[str] = field(default_factory=list)
    """Method-specific teacher computations to add (`--with`): `seeking`, `laten`. Added to a complete
    cache without re-extracting it; each reads its settings from `methods.<name>.teacher`."""


@dataclass
class LoraSettings(Checked):
    """The LoRA adapters every method trains (the papers: r=16 on up/down/v/o)."""

    RANGES = dict(r=AT_LEAST_ONE, alpha=POSITIVE, dropout=FRACTION)

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["up_proj", "down_proj", "v_proj", "o_proj"])


@dataclass
class LoaderConfig(Checked):
    """How stage two streams the cache."""

    RANGES = dict(shuffle_buffer=AT_LEAST_ONE, prefetch=AT_LEAST_ONE, read_workers=AT_LEAST_ONE)

    shuffle_buffer: int = 64
    """Examples held to shuffle and to batch by similar length."""
    prefetch: int = 2
    """Batches read ahead on a background thread."""
    read_workers: int = 4
    """Threads decompressing a group's arrays."""


@dataclass
class AlignConfig(Checked):
    """Stage two: `pkt align` trains the student from the cache alone."""

    RANGES = dict(epochs=POSITIVE, steps=NON_NEGATIVE, batch_size=AT_LEAST_ONE, micro_batch_size=NON_NEGATIVE, lr=POSITIVE,
                  weight_decay=NON_NEGATIVE, warmup_steps=NON_NEGATIVE, warmup_ratio=FRACTION,
                  max_grad_norm=Range(0, low_open=True, unbounded=True),
                  seed=NON_NEGATIVE, checkpoint_every=AT_LEAST_ONE)

    cache: str = "cache/teacher"
    """Cache folder or fsspec URL written by `pkt extract`."""
    method: str = "semalign"
    """A registered method: `pkt align --list-methods`."""
    out: str = "runs/align"
    epochs: float = 1.0
    """Passes over the cached examples; every method gets the same budget."""
    steps: int = 0
    """Optimizer steps in all (overrides `epochs` when > 0)."""
    batch_size: int = 8
    output_tokens: str = "supervised"
    """The tokens the output losses (KL to the teacher, cross-entropy) see: the cache's `supervised` mask,
    every token of an `extract.train_on_inputs` cache (as the papers trained MMLU), or the `answer` (reply)
    tokens alone (on MMLU ~1% of them: the letter and its lead-in)."""
    micro_batch_size: int = 0
    """Examples per forward/backward: a batch is cut into micro-batches whose gradients add up to one
    update (the same step in less memory; each micro-batch is weighted by its share of what the
    method's loss averages over: scored tokens, or examples for LaTen).
    0 means the method's own default (the whole batch, except LaTen: one, as published)."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up steps at the start of each phase; 0 means `warmup_ratio` of the phase's steps."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of each phase's steps (transformers' convention; Seeking published 0.03)."""
    max_grad_norm: float = 1.0
    """Clip the gradient's norm to this (`.inf`: no clipping, as LaTen's published recipe)."""
    seed: int = 0
    checkpoint_every: int = 50
    """Steps between checkpoints; a killed run resumes from the last one."""
    report_map: bool = False
    """Also write the method's report before and after training (`Method.report`; SemAlign's: pairing,
    recomposition fidelity, CKA before/after, in map_report.json)."""
    overwrite: bool = False
    """Replace a finished run, or a run of other settings, in `out`; a killed run of these settings resumes."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    loader: LoaderConfig = field(default_factory=LoaderConfig)


@dataclass
class EvalConfig(Checked):
    """`pkt eval`: benchmark scores of one model."""

    RANGES = dict(limit=NON_NEGATIVE, nll_limit=NON_NEGATIVE, seed=NON_NEGATIVE, batch_size=AT_LEAST_ONE,
                  generation_batch_size=AT_LEAST_ONE, max_new_tokens_gsm8k=AT_LEAST_ONE, max_new_tokens_code=AT_LEAST_ONE,
                  timeout_s=POSITIVE, memory_mb=AT_LEAST_ONE, workers=AT_LEAST_ONE)

    model: str = ""
    """The model to score: hub id, local HF directory, .gguf file or an `pkt align` output's model/ folder
    (`pkt eval MODEL` sets it)."""
    tasks: list[str] = field(default_factory=lambda: ["mmlu"])
    """Registered evaluation tasks (`evaluation/tasks.py`, plug-ins included): pkt's own are `mmlu`, `gsm8k`,
    `humaneval`, `mbpp` (test sets: for reporting) and `dev` (for tuning)."""
    dev_data: list[str] = field(default_factory=lambda: ["mmlu/align"])
    """The `dev` task's rows: transfer splits or .jsonl files, each with an optional slice, e.g.
    `gsm/train[512:]` (train rows past those a cache of 512 holds)."""
    out: str = "eval/model"
    limit: int = 0
    """Score a seeded random subset of this many items per task (after decontamination); 0 means all.
    For GSM8K/HumanEval/MBPP: the items generated and judged for accuracy."""
    nll_limit: int | None = None
    """GSM8K/HumanEval/MBPP: items scored by the teacher-forced NLL of their reference reply (one forward
    each, no generation). None: the `limit` items; 0: all. The subset contains the `limit` items (one
    seeded order, nested)."""
    generate: bool = True
    """GSM8K/HumanEval/MBPP: generate and judge answers (accuracy). False scores the NLL only: the cheap,
    continuous metric for dev-set tuning."""
    seed: int = 0
    batch_size: int = 8
    """Items per forward when scoring (MMLU letters, reference NLL)."""
    generation_batch_size: int = 64
    """Rows decoded together (GSM8K, HumanEval, MBPP); a finished row's slot goes to the next prompt. A CPU
    decode step costs far less per row with more rows (0.5B student, fp32, one thread: 59 ms/row at 16 rows,
    28 at 64, 23 at 128) and the tokens do not depend on it; 64 keeps the KV cache ~1 GB for the student
    and ~3 GB for the 1.5B teacher at 512 new tokens."""
    chat: bool = True
    """Render prompts with the tokenizer's chat template (instruct models), when it has one."""
    mmlu_answer_prefix: str = ""
    """Text that opens the model's reply before the MMLU letter is read. A student fine-tuned on the MMLU
    transfer split's replies ("The answer is: B") says the letter after "The answer is:", not as its
    first token; reading it where training put it measures knowledge rather than reply format. Empty
    reads the reply's first token."""
    max_new_tokens_gsm8k: int = 384
    max_new_tokens_code: int = 512
    decontaminate: bool = True
    """Drop test items found in the transfer splits (13-word overlap or verbatim)."""
    timeout_s: float = 10.0
    """Per program, HumanEval/MBPP."""
    memory_mb: int = 1024
    workers: int = 2


@dataclass
class PktConfig:
    teacher: str = "models/qwen2.5-coder-1.5b-instruct"
    """Teacher model: a hub id, a local HF directory or a .gguf file."""
    student: str = "models/qwen2.5-coder-0.5b-instruct"
    """Student model: a hub id, a local HF directory or a .gguf file."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    assets: AssetsConfig = field(default_factory=AssetsConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    """One section per method, read by `pkt_pipeline.methods` (this module imports no method): the
    method's own settings flat, its overrides of the shared `align` budget under `align:`, its teacher
    extra's settings under `teacher:`, e.g. `methods: {kd: {ce_weight: 0.5, align: {lr: 1.0e-4}}}`. So a
    DVC stage per method depends on its own section only. A section may name a variant of a registered
    method (`pkt align --method` takes the variant's name):
    `methods: {semalign-kl-only: {method: semalign, lambda_layer: 0.0}}`."""


MOVED = {
    "align.semalign": "methods.semalign.<key>",
    "align.kd": "methods.kd.<key> (SemAlign's output term: methods.semalign.kl_mode, kl_temperature)",
    "align.laten": "methods.laten.<key>",
    "align.diagnostic_examples": "methods.semalign.diagnostic_examples",
    "extract.laten": "methods.laten.teacher.<key>",
    "extract.seeking": "methods.seeking.teacher.<key>",
}
"""Keys of configs before the methods moved into their own sections -> where they are written now."""


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (), recipe: str = "") -> PktConfig:
    """Build a `PktConfig` from an optional YAML file, then a named recipe (`pkt_pipeline.recipes`, e.g.
    `published`), then `key.sub=value` overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[:exc.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not UTF-8 text; save the config as UTF-8") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded
        source = str(path)
    if recipe:
        from .recipes import recipe as recipe_overrides

        try:
            _deep_update(raw, recipe_overrides(recipe))
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None
        source = f"{source} + recipe {recipe}"
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        _set_dotted(raw, key.strip().split("."), parsed)
    return _build(PktConfig, raw, prefix="", source=source)


def _deep_update(tree: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_update(tree[key], value)
        else:
            tree[key] = value


def to_dict(config: PktConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _set_dotted(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot override inside {key!r}: it is not a section")
        tree = node
    tree[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(_at(source, f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}"))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            if dotted in MOVED:
                raise ConfigError(_at(source, f"{dotted} moved: write {MOVED[dotted]}"))
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(_at(source, f"unknown key {dotted!r}{hint}"))
        kwargs[key] = _coerce(hints[key], value, dotted, source)
    try:
        return cls(**kwargs)
    except InvalidValue as exc:
        raise ConfigError(_at(source, f"{prefix}{exc.key} {exc.reason}")) from None


def _at(source: str, message: str) -> str:
    return f"{source}: {message}" if source else message


def _coerce(hint: Any, value: Any, dotted: str, source: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{dotted}.", source=source)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, dotted, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(_at(source, f"{dotted} must be a mapping, got {value!r}"))
        _, value_type = typing.get_args(hint)
        return {str(k): _coerce(value_type, v, f"{dotted}.{k}", source) for k, v in value.items()}
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(_at(source, f"{dotted} must be one of {list(typing.get_args(hint))}, got {value!r}"))
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(_at(source, f"{dotted} must be a list, got {value!r}"))
        return [_coerce(item_type, v, dotted, source) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads `5e-3` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (str, int, float, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(_at(source, f"{dotted} must be {hint.__name__}, got {value!r}"))
        return value
    raise ConfigError(_at(source, f"{dotted} has an unsupported type {hint!r}"))
