"""Load causal LMs and their tokenizers from a hub id, a local HF directory or a GGUF file.

Every stage loads models through `load_model` / `load_tokenizer`, so the dtype and device
policy and the error messages are the same everywhere:

- a `.gguf` file is dequantized to float by transformers; the quantizer marks it leaves
  behind are cleared so the model trains with peft and saves with `save_pretrained`;
- on CPU the default dtype is bf16 where the CPU computes it natively (2.5-3x faster than
  fp32 on AVX512-BF16/AMX machines), on GPU bf16 where supported, else fp16;
- `trust_remote_code` stays off unless the caller asks for it;
- a model larger than one device is split by accelerate (`device_map`, `max_memory`): its layers
  run where they were placed, and `input_device` / `named_tensors` read it as if it were whole.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import itertools
import re
import resource
import time
from collections.abc import Iterator, Mapping
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
    device_map: str | Mapping[str, int | str] = "",
    max_memory: Mapping[str, int | str] | None = None,
    offload_folder: str = "",
) -> PreTrainedModel:
    """A causal LM ready for inference or training, on the policy's device and dtype.

    With a `device_map` (a plan of `config.DEVICE_MAP_PLANS` or {module: device}) accelerate places the
    layers over the devices, within `max_memory` ({"0": "70GiB", "cpu": "200GiB"}), what fits
    nowhere in `offload_folder`; `device` must then stay "auto". Without one the whole model
    moves to `device`. Given the `tokenizer` it will run with, the model must embed every token
    id it can produce (`check_embeddings`)."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(name_or_path)
    placement: dict = {}
    if device_map:
        placement = placement_args(device_map, max_memory, offload_folder, device)
        if isinstance(device_map, Mapping):
            check_map_covers(source, device_map, trust_remote_code)
    elif max_memory:
        raise ModelLoadError("runtime.max_memory applies only with runtime.device_map (e.g. runtime.device_map=auto)")
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    location, extra = source.pretrained_args
    # GGUF tensors dequantize to float32 fastest; the cast to the target dtype follows (a split model loads cast).
    load_dtype = torch.float32 if source.kind == "gguf" and not placement else target_dtype
    try:
        with _gguf_bar_follows_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=load_dtype, trust_remote_code=trust_remote_code, **placement, **extra
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        placed = f" (placed by runtime.device_map={_shown(device_map)})" if placement else ""
        raise ModelLoadError(_explain(source, exc, "model") + placed) from exc
    if tokenizer is not None:
        check_embeddings(model, tokenizer, source)
    if source.kind == "gguf":
        clear_quantizer_flags(model)
    if placement:
        log.info("loaded %s (%s) as %s over %s", source, source.kind, target_dtype,
                 getattr(model, "hf_device_map", device_map))
    else:
        model.to(device=target_device, dtype=target_dtype)
        log.info("loaded %s (%s) as %s on %s", source, source.kind, target_dtype, target_device)
    model.eval()
    return model


def placement_args(device_map: str | Mapping[str, int | str], max_memory: Mapping[str, int | str] | None,
                   offload_folder: str, device: str = "auto") -> dict:
    """`from_pretrained`'s placement arguments for a split model, with every named GPU checked to exist."""
    from .config import check_device_map, check_max_memory

    check_device_map(device_map)
    check_max_memory(max_memory or {})
    if device != "auto":
        raise ModelLoadError(f"runtime.device={device!r} and runtime.device_map={_shown(device_map)} both place the "
                             "model: set one (runtime.device=auto with a device map)")
    named = list(device_map.values()) if isinstance(device_map, Mapping) else []
    named += [int(key) for key in (max_memory or {}) if str(key).isdigit()]
    gpus = torch.cuda.device_count()
    for index in filter(lambda i: i is not None, map(_gpu_index, named)):
        if index >= gpus:
            raise ModelLoadError(f"runtime.device_map / runtime.max_memory name GPU {index}, but this torch sees "
                                 f"{gpus} CUDA device(s)")
    args: dict = {"device_map": dict(device_map) if isinstance(device_map, Mapping) else device_map}
    if max_memory:
        args["max_memory"] = {int(key) if str(key).isdigit() else key: size for key, size in max_memory.items()}
    if offload_folder:
        args["offload_folder"] = offload_folder
    return args


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM a config describes, built on the meta device: its modules and shapes, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def parameter_count(config: PretrainedConfig, trust_remote_code: bool = False) -> int:
    """A model's parameter count from its config alone (tied weights counted once)."""
    return sum(p.numel() for p in meta_model(config, trust_remote_code).parameters())


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul on `device` in `dtype`, best of `repeats` after one warm-up: what a
    dense forward can reach here, for time estimates."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def check_map_covers(source: ModelSource, device_map: Mapping[str, int | str], trust_remote_code: bool = False) -> None:
    """Refuse a {module: device} map naming a module the model lacks, or leaving some weights unplaced:
    transformers ignores an unknown name, so a typo would place nothing. Read on an empty (meta) model."""
    import difflib

    skeleton = meta_model(load_model_config(source.location, trust_remote_code), trust_remote_code)
    modules = [name for name, _ in skeleton.named_modules()]
    for key in device_map:
        if key not in modules:
            close = difflib.get_close_matches(key, modules, n=1)
            raise ModelLoadError(f"runtime.device_map.{key}: {source} has no module {key!r}"
                                 + (f"; did you mean {close[0]!r}?" if close else ""))
    unplaced = sorted({name.rsplit(".", 1)[0] for name, _ in skeleton.named_parameters()
                       if not any(key == "" or name.startswith(f"{key}.") for key in device_map)})
    if unplaced:
        raise ModelLoadError(f"runtime.device_map places no device for {', '.join(unplaced[:5])}"
                             f"{f' and {len(unplaced) - 5} more' if len(unplaced) > 5 else ''} of {source}: name "
                             "each of them or a module holding them")


def _gpu_index(target: int | str) -> int | None:
    if isinstance(target, int):
        return target
    if target.startswith("cuda"):
        return torch.device(target).index or 0
    return None


def _shown(device_map: str | Mapping) -> str:
    return device_map if isinstance(device_map, str) else str(dict(device_map))


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a forward's inputs go, and its outputs come back to: the main device of a split model
    (its first parameter may be an offloaded placeholder on `meta`), else the device of its weights."""
    hook = getattr(model, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution)
    return next(model.parameters()).device


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`model.state_dict()` in name order with the real values of offloaded entries (a split model keeps
    `meta` placeholders in their place): one offloaded block at a time is read in, so a model larger
    than memory is read whole block by block."""
    from accelerate.utils import align_module_device, has_offloaded_params

    state = model.state_dict()
    blocks = {name: module for name, module in model.named_modules() if name and has_offloaded_params(module)}

    def block_of(key: str) -> str:
        parts = key.split(".")
        return next((".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in blocks), "")

    # The keys of one block share its prefix, so they are contiguous in name order.
    for block, keys in itertools.groupby(sorted(state), key=block_of):
        if not block:
            yield from ((key, state[key]) for key in keys)
            continue
        with align_module_device(blocks[block], "cpu"):
            values = blocks[block].state_dict(prefix=f"{block}.")
            yield from ((key, values[key]) for key in keys)


def tensor_values(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{what: value} for parameters of `model` given as {what: parameter}: the parameters themselves, or
    for offloaded ones (on `meta`) their values read back on the CPU."""
    if not any(tensor.device.type == "meta" for tensor in tensors.values()):
        return {what: tensor.detach() for what, tensor in tensors.items()}
    names = {id(parameter): name for name, parameter in model.named_parameters(remove_duplicate=False)}
    wanted = {names[id(tensor)]: what for what, tensor in tensors.items()}
    return {wanted[name]: value.detach().clone() for name, value in named_tensors(model) if name in wanted}


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


def distributed_context() -> tuple[int, int]:
    """(rank, world size), starting torch.distributed when launched by torchrun / accelerate launch.

    Each rank takes the GPU of its LOCAL_RANK first, so NCCL's collectives run on the rank's own device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        nccl = torch.cuda.is_available()
        if nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if nccl else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def rank_device(device: str, world: int) -> torch.device:
    """`runtime.device` for this rank: `auto` under several ranks is the rank's own GPU (LOCAL_RANK)."""
    if device == "auto" and world > 1 and torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return resolve_device(device)


def barrier(world: int) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world > 1:
        torch.distributed.barrier()
