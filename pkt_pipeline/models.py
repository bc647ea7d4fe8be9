"""Load causal LMs and their tokenizers from a hub id, a local HF directory or a GGUF file.

Every stage loads models through `load_model` / `load_tokenizer`, so the dtype and device
policy and the error messages are the same everywhere:

- a `.gguf` file is dequantized to float by transformers; the quantizer marks it leaves
  behind are cleared so the model trains with peft and saves with `save_pretrained`;
- on CPU the default dtype is bf16 where the CPU computes it natively (2.5-3x faster than
  fp32 on AVX512-BF16/AMX machines), on GPU bf16 where supported, else fp16;
- `trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from .config import LoraSettings

log = logging.getLogger(__name__)

# `name` or `org/name`, as on the Hugging Face hub.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _local_roots() -> set[str]:
    """Top-level names in the working directory: `models/x` then means a path, not a hub org."""
    return {entry.name for entry in Path.cwd().iterdir() if entry.is_dir()}


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be found or read; the message names the source."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: exactly one of a hub id, a local directory or a GGUF file."""

    kind: str  # "hub", "dir" or "gguf"
    location: str

    @property
    def pretrained_args(self) -> tuple[str, dict]:
        """Arguments for transformers' `from_pretrained` that read this source."""
        if self.kind == "gguf":
            path = Path(self.location)
            return str(path.parent), {"gguf_file": path.name}
        return self.location, {}

    def __str__(self) -> str:
        return self.location


def resolve_source(name_or_path: str | os.PathLike) -> ModelSource:
    """Classify a model reference, refusing paths that do not exist.

    Anything on disk is a path. What is not on disk is a hub id only if it has a hub id's
    shape (`name` or `org/name`) and does not start in a local folder or end in `.gguf`;
    otherwise it is a missing path, reported as such rather than as a failed download.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" It holds {ggufs[0].name}: pass that file instead." if ggufs else ""
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json).{hint}")
        return ModelSource("dir", str(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf model; pass a model directory, a .gguf file or a hub id"
            )
        return ModelSource("gguf", str(path))
    if not _HUB_ID.fullmatch(text) or text.lower().endswith(".gguf") or Path(text).parts[0] in _local_roots():
        raise ModelLoadError(f"model not found: {path} does not exist")
    return ModelSource("hub", text)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but this torch sees no CUDA device")
    return resolved


@functools.cache
def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmuls (AVX512-BF16 or AMX); emulated bf16 is slow."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_facts() -> dict:
    """What decides CPU throughput, for benchmark records: the CPU model, torch's threads and the
    vector extensions (native bf16 or not: without it pkt computes in fp32, ~2.5x slower)."""
    flags: set[str] = set()
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
    return {"model": model, "threads": torch.get_num_threads(), "native_bf16": cpu_supports_bf16(),
            **{flag: flag in flags for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}}


def peak_rss_gib(ndigits: int | None = 2) -> float:
    """This process's peak resident memory so far in GiB (Linux reports `ru_maxrss` in KiB), rounded to
    `ndigits` as the stages record it; None keeps every digit."""
    gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return gib if ndigits is None else round(gib, ndigits)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"unknown floating-point dtype {dtype!r} (try bfloat16, float16 or float32)")
        return resolved
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model source, with a pad token (the EOS token when none is defined)."""
    from transformers import AutoTokenizer

    source = resolve_source(name_or_path)
    location, extra = source.pretrained_args
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_explain(source, exc, "tokenizer")) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(name_or_path: str | os.PathLike, trust_remote_code: bool = False,
                      needed_for: str = "") -> PretrainedConfig:
    """A model's transformers config alone (its shape), never its weights. `needed_for` says what reads it,
    so a missing model is reported as that need (`pkt extract --with laten` reads the student's shape)."""
    from transformers import AutoConfig

    try:
        source = resolve_source(name_or_path)
        location, extra = source.pretrained_args
        try:
            return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(_explain(source, exc, "config")) from exc
    except ModelLoadError as exc:
        if not needed_for:
            raise
        raise ModelLoadError(f"{needed_for}: {exc}") from exc


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """A causal LM ready for inference or training, on the policy's device and dtype.

    Given the `tokenizer` it will run with, the model must embed every token id it can produce
    (`check_embeddings`)."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(name_or_path)
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    location, extra = source.pretrained_args
    # GGUF tensors dequantize to float32 fastest; the cast to the target dtype follows.
    load_dtype = torch.float32 if source.kind == "gguf" else target_dtype
    try:
        with _gguf_bar_follows_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=load_dtype, trust_remote_code=trust_remote_code, **extra
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(_explain(source, exc, "model")) from exc
    if tokenizer is not None:
        check_embeddings(model, tokenizer, source)
    if source.kind == "gguf":
        clear_quantizer_flags(model)
    model.to(device=target_device, dtype=target_dtype)
    model.eval()
    log.info("loaded %s (%s) as %s on %s", source, source.kind, target_dtype, target_device)
    return model


def with_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """`model` wrapped by peft with fresh LoRA adapters as `align.lora` sets them (A random: seed first)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def check_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: ModelSource | str) -> None:
    """Refuse a model whose input embedding has fewer rows than its tokenizer has tokens: the first id past
    the matrix would fail deep inside a forward as a bare "index out of range"."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ModelLoadError(
            f"the model at {source} embeds {rows} tokens but its tokenizer has {len(tokenizer)}: token ids "
            f"{rows}..{len(tokenizer) - 1} have no embedding row. Pair the model with its own tokenizer, or resize "
            "its embeddings to the tokenizer (`model.resize_token_embeddings(len(tokenizer))`) and save it.")


@contextlib.contextmanager
def _gguf_bar_follows_transformers():
    """transformers' GGUF conversion draws a bare tqdm bar that ignores its own `disable_progress_bar()`
    (which `--no-progress` calls); hide that bar too while the switch is off."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def clear_quantizer_flags(model: PreTrainedModel) -> None:
    """Make a dequantized GGUF model an ordinary float model.

    transformers dequantizes GGUF weights into plain float tensors but still marks the model
    as quantized (`hf_quantizer`, `is_quantized`, `config.quantization_config`); with those
    marks `save_pretrained` refuses to save and peft treats the model as not trainable.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.quantization_method = None


def is_quantized(model: PreTrainedModel) -> bool:
    return bool(
        getattr(model, "hf_quantizer", None) is not None
        or getattr(model, "is_quantized", False)
        or getattr(model.config, "quantization_config", None) is not None
    )


def _explain(source: ModelSource, exc: Exception, what: str) -> str:
    if source.kind == "hub":
        return (
            f"could not load the {what} of hub id {source.location!r}: {str(exc).rstrip('.')}. "
            "If this machine is offline, download it elsewhere and pass the local directory, "
            "or a .gguf file (`pkt assets fetch` provides pinned models under models/)."
        )
    return f"could not read the {what} at {source.location} ({source.kind}): {exc}"
