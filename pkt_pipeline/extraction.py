"""What stage one computes from the teacher: per-layer hidden states, top-k log-probs, weights.

`capture_batch` runs one padded forward pass and returns, per example, exactly the tensors the
cache stores; `group_blocks` lays a group's examples into whole-shard blocks for the writer;
`extract_groups` runs both over the groups to write, overlapping each group's write with the
next group's forward.
"""

from __future__ import annotations

import hashlib
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache.codecs import encode_topk
from .cache.layout import CacheError, CaptureSettings, TeacherInfo, TokenizerInfo, delta_key, encode, hidden_key
from .cache.store import CacheWriter
from .models import input_device, named_tensors, tensor_values
from .residual import decoder_of, forward_with_residual_stream, residual_delta
from .write_errors import write_failed

__all__ = ["CAPTURE_KINDS", "CaptureSettings", "Interrupted", "NonFiniteTeacher", "capture_batch", "extract_groups",
           "group_blocks", "length_batches", "logprobs_of", "teacher_info", "tokenizer_info", "top_k_logprobs"]

CAPTURE_KINDS = ("hidden", "delta")


class NonFiniteTeacher(CacheError):
    """The teacher produced NaN or inf: caching it would make every student trained on it diverge."""


def check_finite(values: dict[str, torch.Tensor], example_id: str, what: str = "") -> None:
    """Refuse NaN/inf in any of `values`, naming the array and the example."""
    for key, tensor in values.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteTeacher(
                f"the teacher produced non-finite values (NaN/inf) in {what}{key} for example {example_id!r} "
                f"({bad} of {tensor.numel()} values); nothing of it was cached. Check the teacher's weights, or "
                "run it in a wider dtype (runtime.dtype=float32 or bfloat16: float16 overflows in some models)")


@torch.no_grad()
def capture_batch(model, batch: list, settings: CaptureSettings) -> list[dict[str, torch.Tensor]]:
    """One forward pass over right-padded `batch` (objects with `.input_ids`); per-example outputs.

    Hidden states are the residual stream, h_L the last layer's raw output (`residual.py`), so a
    delta is every layer's true contribution. Right padding leaves every real position's causal
    computation unchanged. Log-probs are
    taken in float32 a few positions at a time, so no [B, T, V] float32 tensor exists.
    A teacher split over devices returns its outputs on the input device but h_L, a hook's catch, on the
    last layer's: every state moves to the input device before it is used.
    """
    device = input_device(model)
    longest = max(len(example.input_ids) for example in batch)
    input_ids = torch.zeros((len(batch), longest), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, example in enumerate(batch):
        input_ids[row, : len(example.input_ids)] = torch.from_numpy(example.input_ids.astype(np.int64))
        attention_mask[row, : len(example.input_ids)] = 1
    output, states = forward_with_residual_stream(model, input_ids=input_ids.to(device),
                                                  attention_mask=attention_mask.to(device))
    states = tuple(state.to(device) for state in states)  # [B, T, D] each
    results = []
    for row, example in enumerate(batch):
        length = len(example.input_ids)
        captured = {}
        for layer in settings.layers:
            if "hidden" in settings.kinds:
                captured[hidden_key(layer)] = states[layer][row, :length]
            if "delta" in settings.kinds and layer >= 1:
                captured[delta_key(layer)] = residual_delta(states[layer][row, :length], states[layer - 1][row, :length])
        values, indices, target = logprobs_of(output.logits[row, :length], settings.top_k,
                                              input_ids[row, 1:length].to(output.logits.device))
        captured["topk/logprobs"] = values
        captured["topk/indices"] = indices.to(torch.int32)
        captured["target_logprob"] = target
        check_finite(captured, example.example_id)
        results.append(captured)
    return results


def top_k_logprobs(logits: torch.Tensor, k: int, rows_per_step: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`log_softmax(logits.float()).topk(k)` without a full float32 [T, V] log-softmax (`logprobs_of`)."""
    values, indices, _ = logprobs_of(logits, k, logits.new_zeros(0, dtype=torch.long), rows_per_step)
    return values, indices


def logprobs_of(logits: torch.Tensor, k: int, next_ids: torch.Tensor,
                rows_per_step: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs [T, k], their ids [T, k], the log-prob of each next token in the text [T]) of one
    sequence's `logits` [T, V], whose next tokens are `next_ids` [T - 1] (the last position has none: 0).

    Working through a few positions at a time keeps the float32 copy in cache, and top-k of the logits minus
    their logsumexp equals top-k of the log-probs: 3-4x faster on CPU at a 150k vocabulary, where the naive
    form costs a quarter of the forward pass. One logsumexp serves both the top-k and the next tokens."""
    values, indices = [], []
    target = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows_per_step):
        block = logits[start:start + rows_per_step].float()
        normaliser = torch.logsumexp(block, dim=-1, keepdim=True)  # [R, 1]
        top_values, top_indices = block.topk(k, dim=-1)
        values.append(top_values - normaliser)
        indices.append(top_indices)
        scored = next_ids[start:start + len(block)]  # [R'] (R' = R but at the last block)
        target[start:start + len(scored)] = (block[:len(scored)].gather(1, scored[:, None]) - normaliser[:len(scored)])[:, 0]
    return torch.cat(values), torch.cat(indices), target


def group_blocks(
    examples: list, captured: list[dict[str, torch.Tensor]], offsets: list[int], group_start: int,
    chunk_tokens: int, settings: CaptureSettings,
) -> dict[str, np.ndarray]:
    """One group's rows of every array: each example at its offset, zero-padded to a whole chunk.

    The rest of the group's shard is never written: zarr leaves it as fill value.
    """
    used = max(offset - group_start + len(example.input_ids) for example, offset in zip(examples, offsets))
    rows = -(-used // chunk_tokens) * chunk_tokens
    blocks: dict[str, np.ndarray] = {}

    def place(key: str, start: int, values: np.ndarray) -> None:
        if key not in blocks:
            blocks[key] = np.zeros((rows, *values.shape[1:]), dtype=values.dtype)
        blocks[key][start:start + len(values)] = values

    for example, tensors, offset in zip(examples, captured, offsets):
        start = offset - group_start
        place("tokens", start, example.input_ids.astype(np.int32))
        place("supervised", start, example.supervised.astype(bool))
        place("answer", start, example.answer.astype(bool))
        place("spans", start, example.offsets.astype(np.int32))
        for key, tensor in tensors.items():
            if key == "target_logprob":
                place(key, start, tensor.cpu().numpy())
            elif not key.startswith("topk/"):
                place(key, start, encode(tensor, settings.storage_dtype))
        values, indices = encode_topk(tensors["topk/logprobs"], tensors["topk/indices"], settings.topk_codec)
        place("topk/logprobs", start, values)
        place("topk/indices", start, indices)
    return blocks


def weights_sha256(model) -> str:
    """A hash of the parameter values, whatever file format they came from and however the model is split
    over devices (offloaded weights are read back, block by block)."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors(model):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        flat = tensor.detach().contiguous().view(-1)
        digest.update(flat.view(torch.uint8).cpu().numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """A hash of what decides token ids of a chat: the tokenizer definition and the chat template."""
    digest = hashlib.sha256(vocabulary_sha256(tokenizer).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()


def vocabulary_sha256(tokenizer) -> str:
    """A hash of the token <-> id mapping alone (vocabulary, merges, special tokens, normalisation).

    Stage two trains on cached token ids, so a student needs this to match the teacher's, not the
    chat template: models of one family often ship templates that differ in unused tool-call text.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def final_norm_and_head(model) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The teacher's final norm weight, LM head and norm epsilon, found through the HF API (read back
    where a split teacher offloaded them)."""
    decoder = decoder_of(model)
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__}")
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or model.config.rms_norm_eps
    values = tensor_values(model, {"norm": norm.weight, "head": model.get_output_embeddings().weight})
    return values["norm"], values["head"], float(eps)


def teacher_info(model, teacher_id: str) -> TeacherInfo:
    """The manifest's record of the teacher: what it is, and a hash of its weights."""
    return TeacherInfo(id=teacher_id, weights_sha256=weights_sha256(model), dtype=str(model.dtype).replace("torch.", ""),
                       num_layers=model.config.num_hidden_layers, hidden_size=model.config.hidden_size,
                       vocab_size=model.config.vocab_size, architecture=type(model).__name__)


def tokenizer_info(tokenizer) -> TokenizerInfo:
    return TokenizerInfo(sha256=tokenizer_sha256(tokenizer), vocab_size=len(tokenizer),
                         vocabulary_sha256=vocabulary_sha256(tokenizer))


class Interrupted(RuntimeError):
    """Ctrl-C arrived; the group in flight was finished and the cache is consistent."""


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices into `lengths` in batches of similar length (sorted, then cut), longest first.

    A group's examples are batched by length rather than in order: MMLU rows run from ~60 to 512
    tokens, and a batch padded to its longest row spends most of its compute on padding. Only the
    forward's batching changes; the group is written in its own order, so the cache is the same.
    Longest first, so a batch that does not fit in memory fails at once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def extract_groups(model: torch.nn.Module, writer: CacheWriter, examples: list, groups: list[list[int]],
                   offsets: list[int], todo: list[int], settings: CaptureSettings, batch_size: int,
                   progress: bool = True) -> int:
    """Capture and write the groups in `todo`; each group's write overlaps the next group's forward.

    Returns the number of tokens written. Ctrl-C stops after the group in flight (Interrupted).
    """
    shard_tokens, chunk_tokens = writer.layout.shard_tokens, writer.layout.chunk_tokens
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True
        tqdm.write("interrupt: finishing the group in flight, then stopping (Ctrl-C again to abort at once)")

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    tokens_total = sum(len(examples[i].input_ids) for g in todo for i in groups[g])
    bar = tqdm(total=tokens_total, desc="extract", unit="tok", unit_scale=True, disable=not progress)
    pending: Future | None = None
    written = 0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkt-writer") as pool:
            for g in todo:
                members = [examples[i] for i in groups[g]]
                captured: list = [None] * len(members)
                for rows in length_batches([len(e.input_ids) for e in members], batch_size):
                    batch = [members[r] for r in rows]
                    for r, result in zip(rows, capture_batch(model, batch, settings)):
                        captured[r] = result
                    bar.update(sum(len(e.input_ids) for e in batch))
                blocks = group_blocks(members, captured, [offsets[i] for i in groups[g]], g * shard_tokens,
                                      chunk_tokens, settings)
                if pending is not None:
                    finish_write(pending, writer)
                group_tokens = sum(len(e.input_ids) for e in members)
                pending = pool.submit(writer.write_group, g, blocks, {"examples": len(members), "tokens": group_tokens})
                written += group_tokens
                if interrupted["flag"]:
                    break
            if pending is not None:
                finish_write(pending, writer)
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted["flag"]:
        raise Interrupted(
            f"interrupted: {len(writer.finished_groups())}/{writer.layout.groups} groups are safely in "
            f"{writer.files.url}; rerun the same command to resume"
        )
    return written


def finish_write(pending: Future, writer: CacheWriter) -> None:
    """Wait for a group's write; a failed one (a full disk) is reported with what is safe."""
    try:
        pending.result()
    except OSError as exc:
        raise write_error(writer, exc) from exc


def write_error(writer: CacheWriter, exc: OSError) -> CacheError:
    return CacheError(write_failed(writer.files.url, exc,
                                   f"The {len(writer.finished_groups())} groups in the ledger are intact"))
