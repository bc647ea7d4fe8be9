"""One typed configuration object for every stage, loaded from YAML with CLI overrides.

A config file mirrors `PktConfig`: one section per concern. Unknown keys and values of the
wrong type are refused with the dotted key named, so a typo never silently falls back to a
default. Overrides use dotted keys (`--set assets.dtype=float32`); values are parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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
                if item is not None and not allowed.admits(item):
                    raise InvalidValue(key, f"must be {allowed}, got {value!r}")


@dataclass
class RuntimeConfig:
    """Where and in which precision models run."""

    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: str = "auto"
    """`auto` (bf16 on a CPU that supports it and on GPUs that do, else fp16/fp32), or a torch dtype name."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust that repository."""


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
class LatenExtractConfig(Checked):
    """LaTen's teacher side (`pkt extract --with laten`, METHOD.md section 2): locate the teacher's layers
    and neurons per example and cache the selected rows/columns. The defaults below that say "published"
    are the published ones (Tan et al., ACL 2025, github.com/Trae1ounG/Neural_Incompatibility); the
    whole published recipe, with the file each value comes from, is `pkt_pipeline/recipes.py`
    (`--recipe published`)."""

    RANGES = dict(locate_examples=NON_NEGATIVE, transfer_rate=Range(0, 1, low_open=True), readout_vocab=NON_NEGATIVE,
                  seed=NON_NEGATIVE)

    extract_data: str = ""
    """Locating examples (.jsonl or TASK/SPLIT); empty means `extract.jsonl` beside the cached data."""
    align_data: str = ""
    """Alignment examples (.jsonl or TASK/SPLIT); empty means `align.jsonl` beside the cached data."""
    inject_data: str = ""
    """Where the example whose neurons receive the final injection is drawn from; empty means the
    cached data itself (the published inference samples one train-split example)."""
    locate_examples: int = 8
    """At most this many extract examples are located, one per training step, so this is the translator
    checkpoint that gets evaluated (8: the published Qwen script's `checkpoint_7`); 0 means all. The
    learning-rate schedule spans the whole extract split however many are located (`align.laten`)."""
    transfer_rate: float = 0.1
    """Neurons per layer and module kind, as a fraction of the student's width (published 0.1)."""
    modules: list[str] = field(default_factory=lambda: ["up_proj", "down_proj", "v_proj", "o_proj"])
    """Which weights transfer: rows of up/v, columns of down/o (the published Llama run used all four)."""
    readout_norm: str = "final"
    """How a component's write is read through the final norm: `final` scales by the RMS of the
    position's final residual state, as the published code does (the normaliser the real prediction
    used); `own` applies the RMSNorm to each patched state itself."""
    readout_vocab: int = 0
    """0 (published): every score reads the whole vocabulary's softmax, [neurons, D] x [D, V] per layer —
    seconds on a GPU, ~15 minutes per example for the 1.5B teacher on a 2-core CPU. N > 0: exact over
    the N likeliest tokens at that position and first order over the rest (error ~ tail mass x d^2/2;
    the largest tail mass is recorded in the manifest). Only with `readout_norm: final`."""
    seed: int = 42
    """Seeds the choice of the located and injection examples (published seed 42)."""
    storage_dtype: str = "float16"
    """Dtype of the cached teacher rows: `float16` (refused on overflow) or `float32`."""


@dataclass
class SeekingConfig(Checked):
    """Seeking's teacher side (`pkt extract --with seeking`, METHOD.md section 2; Zhong et al., ICLR 2024,
    github.com/maszhongming/ParaKnowTransfer): per-weight sensitivity on seed examples, the top L_S
    teacher layers, the student-shaped block of highest sensitivity in each `align.lora.target_modules`
    weight, and its rank-r SVD as LoRA factors. Stage two (`pkt align --method seeking`) starts the
    student's LoRA from them and fine-tunes as lora-sft does. The published recipe of both stages, with
    the file each value comes from, is `pkt_pipeline/recipes.py` (`--recipe published`)."""

    RANGES = dict(seed_examples=NON_NEGATIVE, rank=NON_NEGATIVE)

    seed_examples: int = 32
    """Sensitivity is summed over the first N examples of the cached data (published: 32); 0 means all."""
    sensitivity_tokens: str = "answer"
    """The tokens whose loss the sensitivity differentiates: `answer` (published: the seed examples'
    replies only, whatever `extract.train_on_inputs` says) or `supervised` (the cache's own mask, every
    token when `extract.train_on_inputs` is true)."""
    rank: int = 0
    """Rank of the cached LoRA factors; 0 means `align.lora.r` (published 16). Stage two may train a
    smaller `align.lora.r` (it keeps the leading singular directions), not a larger one."""


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
    layers: list[int] = field(default_factory=list)
    """Teacher layers 0..L to capture (0 = embedding output); empty means all."""
    capture: list[str] = field(default_factory=lambda: ["hidden"])
    """`hidden` (the residual stream h_l) and/or `delta` (the residual contribution h_l - h_(l-1))."""
    top_k: int = 64
    """How many next-token log-probs to keep per position."""
    batch_size: int = 8
    storage_dtype: str = "bfloat16"
    """`bfloat16` (stored as its raw uint16 bits) or `float16` (refused on overflow)."""
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
    cache without re-extracting it."""
    laten: LatenExtractConfig = field(default_factory=LatenExtractConfig)
    seeking: SeekingConfig = field(default_factory=SeekingConfig)


@dataclass
class LoraSettings(Checked):
    """The LoRA adapters every method trains (the papers: r=16 on up/down/v/o)."""

    RANGES = dict(r=AT_LEAST_ONE, alpha=POSITIVE, dropout=FRACTION)

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["up_proj", "down_proj", "v_proj", "o_proj"])


@dataclass
class SemAlignConfig(Checked):
    """SemAlign (METHOD.md section 1). Every open point of the paper is a key here."""

    RANGES = dict(pairing_window=NON_NEGATIVE, critical_layers=NON_NEGATIVE, layers=AT_LEAST_ONE,
                  steps_per_layer=NON_NEGATIVE, lambda_layer=NON_NEGATIVE, lambda_out=NON_NEGATIVE)

    objective: str = "v2"
    """`v2`: frontier schedule, one layer trainable at a time (default); `v1`: single phase, cosine losses."""
    layer_loss: str = "relation"
    """v2 layer term: `relation` (centred token-token geometry) or `fisher` (Fisher-weighted logit surrogate)."""
    supervise: str = "delta"
    """Align residual contributions `delta` (v2) or layer outputs `hidden` (v1)."""
    recompose: str = "lstsq"
    """Teacher->student map: `lstsq` (M = pinv(B_S) B_T) or `transpose` (M = B_S^T B_T, the paper). Measured on
    the real pair's MMLU cache (bench/map_conditioning.py): transpose's M has condition number 3832 and keeps a
    median CKA of 0.23 of the teacher's token geometry, lstsq's 61 and 0.43; a head mapped onto itself is
    exact under lstsq and distorted under transpose (relation loss 1.02)."""
    map_space: str = "residual"
    """Map the raw residual stream (`residual`) or after the teacher's final-norm gain (`post_norm`)."""
    pairing: str = "attributed"
    """`attributed` (highest attribution in a window around the proportional layer) or `proportional`."""
    pairing_window: int = 2
    pairing_distinct: bool = True
    """Attributed pairing gives every student layer its own teacher layer (strictly increasing) when the
    teacher is at least as deep; off, neighbours may share one (the METHOD.md rule: non-decreasing)."""
    pairing_score: str = "contribution"
    """The attribution `attributed` pairing ranks by: each layer's `contribution` (grad x delta_l), or its
    `output` (grad x h_l, which grows with depth, so the window's deep edge wins)."""
    critical_layers: int = 0
    """v1 extra: make sure this many top-attributed teacher layers are each paired with some student layer."""
    layers: list[int] = field(default_factory=list)
    """Student layers (1..L_S) to align; empty means all."""
    steps_per_layer: int = 0
    """Steps per frontier stage; 0 splits `align.steps` (or the epochs) evenly over the stages."""
    phase_schedule: str = "constant"
    """Learning rate within each frontier stage after warm-up: `constant`, or `linear` decay to 0 (a stage
    of s steps then gets (s+1)/2 steps' worth of lr: 1.5 at s=2, where a one-phase baseline gets ~s/2 per layer
    over its whole run)."""
    lambda_layer: float = 1.0
    lambda_out: float = 1.0
    layer_tokens: str = "supervised"
    """The tokens the layer term aligns: `supervised` or `answer` (see `align.output_tokens`)."""
    normalise_student: bool = True
    """Normalise student rows per token in the relation loss, as the teacher's are (scale-free on both sides)."""
    trainable: str = "lora"
    """What of the frontier layer trains: its `lora` adapters or its `full` weights (trained in float32)."""


@dataclass
class KDConfig(Checked):
    """Offline logit distillation from the cached teacher top-k (also SemAlign's output term)."""

    RANGES = dict(temperature=POSITIVE, ce_weight=NON_NEGATIVE)

    mode: str = "rest"
    """`rest`: the k cached tokens plus one bucket of the remaining mass; `renormalise`: both renormalised over the k."""
    temperature: float = 1.0
    ce_weight: float = 0.0
    """`kd` only: add this times the cross-entropy on the answers."""


@dataclass
class LatenConfig(Checked):
    """LaTen's student side (METHOD.md section 2): train only the translator hypernetwork, one step per
    located example, then write the translated deltas into the student. The learning rate is
    `align.lr` (the peak of the one-cycle schedule); the step count is one epoch over the located
    examples (`extract.laten.locate_examples`) unless `align.steps` says otherwise; `align.batch_size`,
    `align.weight_decay` and the `align.warmup_*` keys are not used (a step is the located example plus
    `align_examples` alignment examples; the optimizer and schedule are LaTen's own, below). Every
    default here is the published value; the recipe with its sources is `pkt_pipeline/recipes.py`."""

    RANGES = dict(align_examples=NON_NEGATIVE, mse_weight=NON_NEGATIVE, hidden_size=NON_NEGATIVE, init_std=POSITIVE,
                  weight_decay=NON_NEGATIVE, betas=FRACTION, schedule_steps=NON_NEGATIVE, pct_start=FRACTION,
                  div_factor=POSITIVE, final_div_factor=POSITIVE)

    align_examples: int = 15
    """Alignment examples drawn (seeded) per step to go with the located one (published: 15 + 1)."""
    mse_weight: float = 1000.0
    """Weight of the mean square of the translated deltas, summed over module kinds (published 1000)."""
    hidden_size: int = 0
    """Width of each translator MLP's hidden layer; 0 means the teacher's width (published D_T)."""
    init_std: float = 1e-5
    """Std of the translator's normal init (published 1e-5: the edit starts as almost nothing)."""
    weight_decay: float = 0.05
    """AdamW's decoupled weight decay on the translator (published 0.05)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (beta1, beta2) (published). With `cycle_momentum` the schedule drives beta1 instead."""
    schedule_steps: int = 0
    """Length of the one-cycle learning-rate schedule; 0 means one step per example of the extract split
    (published: the schedule spans the split, and a checkpoint part-way along it is evaluated)."""
    pct_start: float = 0.1
    """Fraction of the schedule spent rising from `align.lr / div_factor` to `align.lr` (published 0.1)."""
    div_factor: float = 25.0
    """The schedule starts at `align.lr / div_factor` (torch's default, which the published code keeps)."""
    final_div_factor: float = 1.0
    """The schedule ends at `align.lr / (div_factor * final_div_factor)` (published 1)."""
    anneal_strategy: str = "cos"
    """Shape of the rise and the fall: `cos` (published) or `linear`."""
    cycle_momentum: bool = True
    """Cycle beta1 inversely to the rate between torch's 0.85 and 0.95 (torch's default, which the
    published code keeps: its beta1 of 0.9 is overridden from the first step)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.betas) != 2:
            raise InvalidValue("betas", f"must be two numbers in [0, 1), got {self.betas!r}")


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
                  seed=NON_NEGATIVE, checkpoint_every=AT_LEAST_ONE, diagnostic_examples=AT_LEAST_ONE)

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
    """Write map diagnostics (pairing, recomposition fidelity, CKA before/after) to map_report.json."""
    diagnostic_examples: int = 16
    """Cached examples the map diagnostics use."""
    overwrite: bool = False
    """Start afresh even when `out` holds a checkpoint or a finished run."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    semalign: SemAlignConfig = field(default_factory=SemAlignConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    laten: LatenConfig = field(default_factory=LatenConfig)
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
    generation_batch_size: int = 16
    """Rows decoded together (GSM8K, HumanEval, MBPP); a finished row's slot goes to the next prompt."""
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
    """Per-method overrides of the `align` section, e.g. `methods: {kd: {lr: 1.0e-4}}`: applied when
    that method runs, so a DVC stage per method depends on its own section only. A section may name a
    variant of a registered method (`pkt align --method` takes the variant's name):
    `methods: {semalign-kl-only: {method: semalign, semalign: {lambda_layer: 0.0}}}`."""


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
    config = _build(PktConfig, raw, prefix="", source=source)
    if config.methods:
        from .methods import available_methods

        registered = available_methods()
    for name in config.methods:
        # a typo in any method's section fails now, not hours later when its stage runs
        _check_registered(name, for_method(config, name).align.method, registered)
    return config


def _check_registered(section: str, method: str, registered: list[str]) -> None:
    """A `methods` section must name a registered method, by its own name or (a variant) by `method:`."""
    if method in registered:
        return
    close = difflib.get_close_matches(method, registered, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    known = ", ".join(registered)
    if method == section:
        raise ConfigError(f"methods.{section}: {section!r} is not a registered method{hint}; registered: {known}. "
                          f"A variant of a method names it: `methods: {{{section}: {{method: NAME, ...}}}}`")
    raise ConfigError(f"methods.{section}.method: {method!r} is not a registered method{hint}; registered: {known}")


def for_method(config: PktConfig, method: str) -> PktConfig:
    """The config with `align.method = method` and that method's `methods` overrides applied."""
    raw = to_dict(config)
    overrides = config.methods.get(method) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"methods.{method} must be a mapping of align keys, got {overrides!r}")
    _deep_update(raw["align"], overrides)
    raw["align"]["method"] = overrides.get("method", method)  # a variant names the method it configures
    return _build(PktConfig, raw, prefix="", source=f"methods.{method}")


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
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {dotted!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted, source)
    try:
        return cls(**kwargs)
    except InvalidValue as exc:
        raise ConfigError(f"{source}: {prefix}{exc.key} {exc.reason}") from None


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
            raise ConfigError(f"{source}: {dotted} must be a mapping, got {value!r}")
        _, value_type = typing.get_args(hint)
        return {str(k): _coerce(value_type, v, f"{dotted}.{k}", source) for k, v in value.items()}
    if hint is Any:
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {dotted} must be a list, got {value!r}")
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
            raise ConfigError(f"{source}: {dotted} must be {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{source}: {dotted} has an unsupported type {hint!r}")
