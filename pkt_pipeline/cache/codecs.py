"""How a cache stores its per-token float rows and its top-k: the codecs, and their stated error.

Activation codecs (`extract.storage_dtype`), one row of width D per token:

    bfloat16      uint16 [D]      bf16's raw bits, exact for a bf16 teacher (the default)
    float16       float16 [D]     refused on overflow
    float8_e4m3   uint8 [D + 4]   e4m3 bits of x / s, s = max|x| / 448 per row; the row's s (float32) in the last 4 bytes
    int8          uint8 [D + 4]   int8 of round(x / s), s = max|x| / 127 per row; s as above

The per-row scale sits in the row itself, not in an array beside it: one array per layer keeps the
writer's whole-shard groups, the ledger's checksums and the memory-mapped read path as they are,
and a row decodes alone. Lossy rows decode to bfloat16, so a method sees the same [T, D] bf16
tensors from every codec but float16.

Stated error per element (before the decoded value's own bf16 rounding, relative 2**-9):
int8 |x - x'| <= s / 2 = max|x| / 254; float8_e4m3 |x - x'| <= 2**-4 |x| (3 mantissa bits), or
<= s * 2**-10 below e4m3's smallest normal (s * 2**-6). One outlier dimension (LLM residual streams
hold a few, hundreds of times the rest) sets s, so int8 flattens the other dimensions of its row
where float8's exponent keeps them: bench/cache_fidelity.py measures both on the real teacher.

Top-k codecs (`extract.topk_codec`), k entries per token:

    exact      logprobs float32 [k], indices int32 [k]                    8k bytes
    uint8      logprobs uint8 [k + 8]: code_j = round((m - lp_j) / s), m the row's largest, s = (m - min lp) / 255,
               then logsumexp(lp) and s (float32); indices uint8 [3k]: each id in 3 bytes, little-endian
               (ids < 2**24)    4k + 8 bytes

At k = 64: exact 512 B/token, uint8 264 B/token. Decoding shifts the dequantised row so that its
logsumexp is the stored one: the mass outside the top-k (the `rest` bucket of the KD loss) stays
exact, where a plain dequantisation can sum past 1 and leave the teacher no rest at all; each value
is then within one step s of the exact one (half a step from rounding, at most half from the shift).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import CacheError

ACTIVATION_CODECS = ("bfloat16", "float16", "float8_e4m3", "int8")
LOSSY_ACTIVATION_CODECS = ("float8_e4m3", "int8")
TOPK_CODECS = ("exact", "uint8")
SCALE_BYTES = 4
"""A lossy row's float32 scale, after its D codes."""
TOPK_HEADER = 8
"""A quantised top-k row's m and s (float32 each), after its k codes."""
MAX_PACKED_ID = 2**24
_LIMIT = {"float8_e4m3": 448.0, "int8": 127.0}


def row_format(codec: str, width: int) -> tuple[tuple[int, ...], str]:
    """(row shape, numpy dtype) of one token's row of width `width` stored with `codec`."""
    if codec == "bfloat16":
        return (width,), "uint16"
    if codec == "float16":
        return (width,), "float16"
    if codec in LOSSY_ACTIVATION_CODECS:
        return (width + SCALE_BYTES,), "uint8"
    raise CacheError(f"unknown activation codec {codec!r}; choose one of {ACTIVATION_CODECS}")


def dense_dtype(codec: str) -> str:
    """The float dtype a codec's rows decode to, and that stores the teacher's head (never lossy: the
    semantic map is built from it, and it is stored once, not per token)."""
    return "float16" if codec == "float16" else "bfloat16"


def encode_rows(tensor: torch.Tensor, codec: str) -> np.ndarray:
    """[..., D] floats as the array the cache stores (see the module table)."""
    values = tensor.detach()
    if codec == "bfloat16":
        return values.to(torch.bfloat16).contiguous().view(torch.uint16).cpu().numpy()
    if codec == "float16":
        largest = values.abs().max().item() if values.numel() else 0.0
        if largest > torch.finfo(torch.float16).max:
            raise CacheError(f"value {largest:.4g} overflows float16; store bfloat16 instead")
        return values.to(torch.float16).cpu().numpy()
    if codec not in LOSSY_ACTIVATION_CODECS:
        raise CacheError(f"unknown activation codec {codec!r}; choose one of {ACTIVATION_CODECS}")
    values = values.float().cpu()
    largest = values.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    scale = torch.where(largest > 0, largest / _LIMIT[codec], torch.ones_like(largest))
    scaled = values / scale
    if codec == "int8":
        codes = scaled.round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
    else:
        codes = scaled.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    return np.concatenate([codes.numpy(), scale.numpy().astype("<f4").view(np.uint8)], axis=-1)


def decode_rows(array: np.ndarray, codec: str) -> torch.Tensor:
    """The stored rows as a torch tensor: bf16 and lossy codecs as bfloat16, float16 as float16."""
    array = np.ascontiguousarray(array)
    if codec == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    if codec not in LOSSY_ACTIVATION_CODECS:
        return torch.from_numpy(array)
    codes = torch.from_numpy(np.ascontiguousarray(array[..., :-SCALE_BYTES]))
    scale = torch.from_numpy(np.ascontiguousarray(array[..., -SCALE_BYTES:]).view("<f4").astype(np.float32))
    element = codes.view(torch.int8) if codec == "int8" else codes.view(torch.float8_e4m3fn)
    return (element.float() * scale).to(torch.bfloat16)


def topk_formats(codec: str, k: int) -> tuple[tuple[tuple[int, ...], str], tuple[tuple[int, ...], str]]:
    """(row shape, dtype) of `topk/logprobs` and of `topk/indices` under `codec`."""
    if codec == "exact":
        return ((k,), "float32"), ((k,), "int32")
    if codec == "uint8":
        return ((k + TOPK_HEADER,), "uint8"), ((3 * k,), "uint8")
    raise CacheError(f"unknown top-k codec {codec!r}; choose one of {TOPK_CODECS}")


def encode_topk(logprobs: torch.Tensor, indices: torch.Tensor, codec: str) -> tuple[np.ndarray, np.ndarray]:
    """[T, k] log-probs (descending, as `topk` gives them) and token ids as the arrays the cache stores."""
    values, ids = logprobs.detach().float().cpu(), indices.detach().to(torch.int64).cpu()
    if codec == "exact":
        return values.numpy(), ids.to(torch.int32).numpy()
    if codec != "uint8":
        raise CacheError(f"unknown top-k codec {codec!r}; choose one of {TOPK_CODECS}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= MAX_PACKED_ID):
        raise CacheError(f"token id {int(ids.max())} does not fit the uint8 top-k codec's 3 bytes "
                         f"(ids < {MAX_PACKED_ID}); use extract.topk_codec=exact")
    top = values.amax(dim=-1, keepdim=True)  # [T, 1]
    spread = top - values.amin(dim=-1, keepdim=True)
    scale = torch.where(spread > 0, spread / 255, torch.ones_like(spread))
    codes = ((top - values) / scale).round().clamp(0, 255).to(torch.uint8).numpy()
    total = torch.logsumexp(values, dim=-1, keepdim=True)  # the top-k's mass, kept exact: the rest is 1 - it
    header = np.concatenate([total.numpy(), scale.numpy()], axis=-1).astype("<f4").view(np.uint8)
    packed = ids.numpy().astype("<u4").view(np.uint8).reshape(*ids.shape, 4)[..., :3]
    return np.concatenate([codes, header], axis=-1), np.ascontiguousarray(packed.reshape(*ids.shape[:-1], -1))


def decode_topk(logprobs: np.ndarray, indices: np.ndarray, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored top-k as (log-probs [T, k] float32, token ids [T, k] int64), whatever the codec."""
    if codec == "exact":
        return (torch.from_numpy(np.ascontiguousarray(logprobs, dtype=np.float32)),
                torch.from_numpy(np.asarray(indices).astype(np.int64)))
    if codec != "uint8":
        raise CacheError(f"unknown top-k codec {codec!r}; choose one of {TOPK_CODECS}")
    logprobs = np.ascontiguousarray(logprobs)
    header = torch.from_numpy(np.ascontiguousarray(logprobs[..., -TOPK_HEADER:]).view("<f4").astype(np.float32))
    relative = -torch.from_numpy(logprobs[..., :-TOPK_HEADER].astype(np.float32)) * header[..., 1:]  # [T, k]
    values = relative - torch.logsumexp(relative, dim=-1, keepdim=True) + header[..., :1]
    packed = np.asarray(indices, dtype=np.uint8).reshape(*indices.shape[:-1], -1, 3).astype(np.int64)
    ids = packed[..., 0] | (packed[..., 1] << 8) | (packed[..., 2] << 16)
    return values, torch.from_numpy(ids)


def bytes_per_token(codec: str, topk_codec: str, width: int, float_rows: int, k: int) -> int:
    """Raw (uncompressed) bytes a token costs: its float rows, top-k, token id and two masks."""
    row_shape, dtype = row_format(codec, width)
    (values_shape, values_dtype), (ids_shape, ids_dtype) = topk_formats(topk_codec, k)
    size = lambda shape, dtype: int(np.prod(shape)) * np.dtype(dtype).itemsize  # noqa: E731
    return float_rows * size(row_shape, dtype) + size(values_shape, values_dtype) + size(ids_shape, ids_dtype) + 4 + 2


STORED_RATIO = {"zstd": {"bfloat16": 1.46, "float16": 1.49, "float8_e4m3": 1.33, "int8": 1.77}}
"""Raw / stored bytes of a float row under zstd-3, measured on the real teacher's activations
(bench/cache_fidelity.py, Qwen2.5-Coder-1.5B, MMLU and GSM8K)."""


def stored_ratio(compressor: str, codec: str) -> float:
    """The raw / stored ratio `pkt extract --dry-run` assumes; 1 (no gain, an upper bound on bytes) where unmeasured."""
    return STORED_RATIO.get(compressor, {}).get(codec, 1.0)
