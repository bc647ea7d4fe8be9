"""Greedy generation for the generative tasks (GSM8K, HumanEval, MBPP), with our own decoding loop.

`model.generate` on a static batch runs until the batch's longest row ends: rows that hit EOS early,
and rows whose answer is complete while the model rambles on, keep costing a forward row per step
up to `max_new_tokens`. On a CPU, where a step costs about in proportion to its rows, that waste is
most of an evaluation's time. So `generate` decodes with its own loop over a transformers KV cache:

- prompts (rendered through the chat template when the tokenizer has one: instruct models are
  evaluated as they are used) are tokenized once and queued by token length, so rows prefilled
  together pad little; rows are left-padded so every row's newest token is the last column;
- a row leaves as soon as it ends (EOS, the task's stop rule, or `max_new_tokens`): its rows of the
  KV cache, padding mask, positions are dropped, and the free slot is refilled from the queue (the
  newcomers are prefilled on their own, then left-padded to the batch's cache length, or the batch
  to theirs, and joined; cache columns that became padding in every row are trimmed off);
- the logits are those `model.generate(do_sample=False)` computes for the same row: the same cache
  class, position ids from the padding mask (cumsum - 1, padding at 0), no mask when nothing is
  padded, float32 argmax, and the generation config's repetition penalty over the row's own
  tokens. Padding is masked out exactly, so a row's tokens do not depend on which rows share its
  batch, up to the floating-point noise any batched forward has (none seen in float32). EOS is
  any of the generation config's eos ids (an int or a list) or the tokenizer's. Generation-config
  settings that would change greedy decoding and are not mirrored (beams, n-gram bans, forced or
  suppressed tokens, ...) raise a ValueError instead of decoding differently.

Stop rules: `stop` is a callable `text -> cut | None` applied to the decoded continuation after
every token (decoded without special tokens, as the returned text is); when it returns an index
the row ends and its text is `text[:cut]` (its last token may reach past the cut). Plain strings
(`stop="\\n```"` or a list) cut right AFTER the first stop string to end, so the stop string is
kept in the returned text. A rule must be monotone (once it fires on a prefix it fires, at the
same cut, on every longer text) for the early stop to equal cutting a run to EOS. The task rules:

- `code_stop` (HumanEval, MBPP): the first ``` fenced block has closed. `extract_code` reads only
  that block, so the extracted code is the same as running to EOS, exactly.
- `gsm8k_stop`: a line holding an answer marker ("answer is", "answer:", "\\boxed{") directly
  followed by a number, or a line "#### N", then a blank line. Conservative, not exact: the verdict changes
  only if the model, after a finished answer paragraph, states a different answer again.

Each generative task names its rule (`get_task(name).stop_rule()`, pkt_pipeline/evaluation/tasks.py).

Packed weights: a float32 decode step on a CPU is its linear layers (the MLP's and the lm_head's
matrix products were ~86% of a 16-row step of the 0.5B student), and `nn.Linear` on a few rows
lets MKL re-pack the whole weight on every call. While `greedy_generate` runs, each plain float32
`nn.Linear` is swapped for `_PackedLinear`, oneDNN's linear over a weight reordered once (what
torch.compile's freezing uses on CPU); the model's own modules are put back on exit, errors
included. Measured on this 2-core AVX2 CPU: a 16-row step 1.07 s -> 0.63 s of CPU time, the
tokens the same. It holds a second copy of those weights while generating (2 GB for the 0.5B
student); `pack_weights=False` turns it off.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from pkt_pipeline.evaluation.code_tasks import _FENCE
from pkt_pipeline.models import input_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CODE_INSTRUCTION = "Complete the following Python code. Answer with the code in one ```python block."

StopRule = Callable[[str], "int | None"]


def render_user_turn(tokenizer: PreTrainedTokenizerBase, text: str, chat: bool = True) -> str:
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def code_user_turn(prompt_text: str) -> str:
    """HumanEval/MBPP as an instruction: the model sees the code to complete in a fenced block."""
    return f"{CODE_INSTRUCTION}\n\n```python\n{prompt_text.rstrip()}\n```"


# ---------------------------------------------------------------- stop rules

def stop_at(strings: str | Sequence[str]) -> StopRule:
    """A stop rule for plain strings: fires when any of them appears; the cut is right after the
    occurrence that ends first, so the returned text ends with that stop string."""
    strings = [strings] if isinstance(strings, str) else list(strings)
    if not strings or not all(isinstance(s, str) and s for s in strings):
        raise ValueError(f"stop strings must be non-empty strings, got {strings!r}")

    def rule(text: str) -> int | None:
        ends = [found + len(s) for s in strings if (found := text.find(s)) >= 0]
        return min(ends) if ends else None

    return rule


def code_stop(text: str) -> int | None:
    """Cut after the closing fence of the first fenced code block (the block `extract_code` reads).

    Uses `extract_code`'s own pattern: its first match can no longer change once the closing ```
    is there, so cutting here extracts the same code as the full generation would."""
    match = _FENCE.search(text)
    if match is not None and match.group(0).endswith("```"):
        return match.end()
    return None


# An answer marker (as `gsm8k.extract_final_number` reads them) with a number right after it (only
# punctuation, spaces, "**" or "$" between), the rest of that line, then a blank line. "####" only
# with the number alone on its line ("#### 72"), since "#### 1. Add the apples" is a markdown heading.
_GSM8K_DONE = re.compile(r"(?:(?:answer\s*(?:is|:)|\\boxed\{)[^\w\n]{0,8}\d[^\n]*"
                         r"|####[^\S\n]*[-\u2212]?[$]?\d[\d,.]*[^\S\n]*)\n[^\S\n]*\n", re.IGNORECASE)


def gsm8k_stop(text: str) -> int | None:
    """Cut after the blank line that ends the first paragraph stating an answer ("So the answer is
    18.\\n\\n"): rambling models go on with a new "Question:" there. See the module docstring."""
    match = _GSM8K_DONE.search(text)
    return match.end() if match is not None else None




# ---------------------------------------------------------------- packed weights

class _PackedLinear(torch.nn.Module):
    """An `nn.Linear` whose weight oneDNN has reordered once for products with `rows` rows (a hint:
    any row count works), instead of MKL packing it again on every call."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)  # opaque (out, in)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")  # (..., out)


def _packable(module: torch.nn.Module) -> bool:
    """A plain float32 CPU `nn.Linear` with no accelerate hook (offloaded weights live elsewhere)."""
    return (type(module) is torch.nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32 and not hasattr(module, "_hf_hook")
            and (module.bias is None or module.bias.dtype == torch.float32))


@contextlib.contextmanager
def packed_linears(model: PreTrainedModel, rows: int, enabled: bool = True) -> Iterator[int]:
    """Swap the model's plain float32 CPU linears for `_PackedLinear` for the duration; yields how
    many were swapped (0 when disabled or oneDNN is missing) and always puts the originals back."""
    usable = enabled and torch.backends.mkldnn.is_available() and all(
        hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight"))  # private ops
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    try:
        if usable:
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if _packable(child):
                        setattr(parent, name, _PackedLinear(child, rows))
                        swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


# ---------------------------------------------------------------- KV cache

class _GrowingLayer(DynamicLayer):
    """A full-attention `DynamicLayer` whose `keys`/`values` are views of buffers with `GROW` spare
    columns, so a decode step writes its column in place instead of `torch.cat` copying the layer's
    whole cache into a fresh allocation (~10% of a 64-row step of the 0.5B student at 500 columns).
    Assigning `keys`/`values` (row selection, trimming, joining) adopts the tensor as a buffer with
    no spare room; the next `update` moves it into one that has. The attention reads the same values."""

    GROW = 128

    def __init__(self) -> None:
        self._used = {"_keys": 0, "_values": 0}  # columns in use of each buffer (set apart: `join` assigns one, then reads the other)
        super().__init__()

    def _get(name: str):  # noqa: N805 - builds the two properties below
        def get(self) -> torch.Tensor | None:
            buffer = self.__dict__.get(name)
            return None if buffer is None else buffer[..., :self._used[name], :]

        def put(self, value: torch.Tensor | None) -> None:
            self.__dict__[name] = value
            self._used[name] = 0 if value is None else value.shape[-2]

        return property(get, put)

    keys = _get("_keys")
    values = _get("_values")
    del _get

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]))  # (rows, kv_heads, 0, head_dim)
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        for name, states in (("_keys", key_states), ("_values", value_states)):
            buffer, length = self.__dict__[name], self._used[name]  # (rows, kv_heads, capacity, head_dim)
            if buffer.shape[-2] < length + new:
                grown = states.new_empty((*states.shape[:2], length + new + self.GROW, states.shape[3]))
                grown[..., :length, :] = buffer[..., :length, :]
                self.__dict__[name] = buffer = grown
            buffer[..., length:length + new, :] = states
            self._used[name] = length + new
        return self.keys, self.values


def _new_cache(model):
    """A DynamicCache for `model`, its full-attention layers replaced by `_GrowingLayer`s (other
    layer kinds, e.g. sliding windows, are kept as transformers builds them)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


# ---------------------------------------------------------------- decoding

@dataclass
class Generation:
    """One prompt's greedy continuation."""

    text: str  # decoded without special tokens; cut after the stop when the rule fired
    token_ids: list[int]  # generated tokens, the final EOS included when the row ended on one
    finish: str  # "eos", "stop" or "length"


# Generation-config settings that change greedy decoding and that this loop does not implement, with
# their neutral values; a model whose generation config sets another value is refused rather than
# decoded differently from `model.generate`.
_UNSUPPORTED_SETTINGS: dict[str, tuple] = {
    "num_beams": (None, 1), "sequence_bias": (None, {}), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None, []),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False), "exponential_decay_length_penalty": (None,), "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []), "guidance_scale": (None, 1.0), "watermarking_config": (None,),
    "stop_strings": (None, []),
}


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS ids: the model's generation config (an int or a list) and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        ids.update(int(i) for i in (source if isinstance(source, (list, tuple)) else [source]))
    return ids


def _repetition_penalty(model) -> float:
    """The generation config's repetition penalty (1.0: none), after refusing settings we do not mirror."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return 1.0
    for name, neutral in _UNSUPPORTED_SETTINGS.items():
        value = getattr(config, name, None)
        if value not in neutral:
            raise ValueError(f"the model's generation_config sets {name}={value!r}, which changes greedy decoding "
                             "and is not implemented by pkt's generation loop")
    penalty = getattr(config, "repetition_penalty", None)
    return 1.0 if penalty is None else float(penalty)


class _Rows:
    """The rows decoded together. Every tensor is indexed by row alike; `mask` and the cache share
    their columns: left padding, then each row's prompt and generated tokens."""

    def __init__(self, cache, mask: torch.Tensor, positions: torch.Tensor, last: torch.Tensor,
                 seen: torch.Tensor | None, items: list[int]):
        self.cache = cache
        self.mask = mask  # (rows, columns) long, 1 for a real token
        self.positions = positions  # (rows,) position id of `last`
        self.last = last  # (rows,) the token to feed next
        self.seen = seen  # (rows, vocab) bool: tokens in the row so far (repetition penalty); None without one
        self.items = items  # prompt index of each row

    def __len__(self) -> int:
        return len(self.items)

    def plain(self) -> bool:
        """Whether every cache layer is a plain full-attention layer, whose columns we may pad and trim."""
        return not getattr(self.cache, "offloading", False) and all(
            type(layer) in (DynamicLayer, _GrowingLayer) and layer.is_initialized for layer in self.cache.layers)

    def select(self, keep: list[int]) -> None:
        """Keep only the rows at `keep` (indices into the current rows)."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        self.seen = None if self.seen is None else self.seen[index]
        self.items = [self.items[i] for i in keep]
        if self.plain():
            self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row (left behind by rows that left)."""
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first == 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        self.mask = self.mask[:, first:]

    def join(self, other: "_Rows") -> None:
        """Append `other`'s rows, left-padding whichever side is shorter to the same columns."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)  # (rows, kv_heads, columns, head_dim)
                setattr(mine, name, torch.cat([F.pad(a, (0, 0, width - a.shape[2], 0)),
                                               F.pad(b, (0, 0, width - b.shape[2], 0))]))
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(other.mask, (width - other.mask.shape[1], 0))])
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])
        self.seen = None if self.seen is None else torch.cat([self.seen, other.seen])
        self.items = self.items + other.items


def _next_tokens(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Greedy choice as `generate` makes it: float32 scores, the repetition penalty on tokens the row
    holds (RepetitionPenaltyLogitsProcessor's arithmetic), first argmax."""
    scores = logits.float()  # (rows, vocab)
    if seen is not None:
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(seen, penalised, scores)
    return scores.argmax(dim=-1)


def _mark_seen(seen: torch.Tensor | None, tokens: torch.Tensor) -> None:
    if seen is not None:
        rows = torch.arange(len(tokens), device=tokens.device)
        inside = tokens < seen.shape[1]  # embedding-only ids the head cannot emit are never penalised
        seen[rows[inside], tokens[inside]] = True


def _prefill(model, prompt_ids: list[list[int]], items: list[int], pad_id: int, penalty: float,
             keep_logits: bool) -> _Rows:
    """Run the prompts of `items` (left-padded together) into a fresh cache; `last` holds each row's first new token."""
    device = input_device(model)
    lengths = [len(prompt_ids[i]) for i in items]
    width = max(lengths)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (item, length) in enumerate(zip(items, lengths)):
        ids[row, width - length:] = torch.tensor(prompt_ids[item], dtype=torch.long)
        mask[row, width - length:] = 1
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate: padding at position 0
    padded = min(lengths) != width
    cache = _new_cache(model)
    extra = {"logits_to_keep": 1} if keep_logits else {}
    logits = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=position_ids,
                   past_key_values=cache, use_cache=True, **extra).logits[:, -1]  # (rows, vocab)
    seen = None
    if penalty != 1.0:
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        for row, item in enumerate(items):
            prompt = torch.tensor(prompt_ids[item], dtype=torch.long, device=device)
            seen[row, prompt[prompt < seen.shape[1]]] = True  # ids the head cannot emit are never penalised
    first = _next_tokens(logits, seen, penalty)  # (rows,)
    _mark_seen(seen, first)
    return _Rows(cache, mask, position_ids[:, -1] + 1, first, seen, list(items))


# Prompts per prefill forward: 64 GSM8K prompts (87-199 tokens) prefilled at once are 41% padding, by 16 13%.
PREFILL_ROWS = 16


@torch.inference_mode()
def greedy_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                    batch_size: int = 16, *, stop: StopRule | str | Sequence[str] | None = None, refill: bool = True,
                    progress: bool = True, desc: str = "generate", pack_weights: bool = True) -> list[Generation]:
    """Greedy continuations of already-rendered prompts, in input order (see the module docstring).

    `stop`: a stop rule (`gsm8k_stop`, `code_stop`, any `text -> cut | None`), a string or a list of
    strings (cut right after the stop string), or None (run to EOS or `max_new_tokens`).
    `refill`: give a finished row's slot to the next queued prompt; off, a batch only shrinks
    until it is empty and the next one starts (also the case for caches other than full attention).
    `pack_weights`: run float32 CPU linears on weights packed once (`packed_linears`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    rule = stop_at(stop) if isinstance(stop, (str, list, tuple)) else stop
    model.eval()
    penalty = _repetition_penalty(model)
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    empty = [i for i, ids in enumerate(prompt_ids) if not ids]
    if empty:
        raise ValueError(f"prompts {empty[:5]} are empty (no tokens); a prompt needs at least one token")

    queue = deque(sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i])))
    # Rows prefilled together are padded to the longest; a few at a time (joined after) pads them far less.
    joinable = all(type(layer) is _GrowingLayer for layer in _new_cache(model).layers)
    prefill_rows = PREFILL_ROWS if joinable else batch_size
    tokens: dict[int, list[int]] = {}
    results: list[Generation | None] = [None] * len(prompts)
    rows: _Rows | None = None

    def finished(item: int) -> Generation | None:
        generated = tokens[item]
        text = None
        if rule is not None:
            text = tokenizer.decode(generated, skip_special_tokens=True)
            cut = rule(text)
            if cut is not None:
                return Generation(text[:cut], generated, "stop")
        if generated[-1] in eos or len(generated) >= max_new_tokens:
            text = tokenizer.decode(generated, skip_special_tokens=True) if text is None else text
            return Generation(text, generated, "eos" if generated[-1] in eos else "length")
        return None

    def settle(batch: _Rows) -> _Rows | None:
        """Record the token just chosen for every row; drop the rows that ended."""
        keep = []
        for row, (item, token) in enumerate(zip(batch.items, batch.last.tolist())):
            tokens.setdefault(item, []).append(token)
            result = finished(item)
            if result is None:
                keep.append(row)
            else:
                results[item] = result
                bar.update(1)
        if not keep:
            return None
        if len(keep) < len(batch):
            batch.select(keep)
        return batch

    with packed_linears(model, min(batch_size, len(prompts)), pack_weights), \
            tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress) as bar:
        while queue or rows is not None:
            free = batch_size - (0 if rows is None else len(rows))
            if queue and free > 0 and (rows is None or (refill and rows.plain())):
                newcomers = None
                arriving = [queue.popleft() for _ in range(min(free, len(queue)))]  # shortest prompts first
                for start in range(0, len(arriving), prefill_rows):
                    part = _prefill(model, prompt_ids, arriving[start:start + prefill_rows], pad_id, penalty, keep_logits)
                    if newcomers is None:
                        newcomers = part
                    else:
                        newcomers.join(part)
                newcomers = settle(newcomers)
                if newcomers is not None:
                    if rows is None:
                        rows = newcomers
                    else:
                        rows.join(newcomers)
                continue
            # One decoding step for every row: feed `last` at `positions`, one more mask column.
            rows.mask = torch.cat([rows.mask, rows.mask.new_ones((len(rows), 1))], dim=1)  # (rows, columns + 1)
            padded = not bool(rows.mask.all())
            logits = model(input_ids=rows.last[:, None], attention_mask=rows.mask if padded else None,
                           position_ids=rows.positions[:, None], past_key_values=rows.cache,
                           use_cache=True).logits[:, -1]  # (rows, vocab)
            rows.last = _next_tokens(logits, rows.seen, penalty)
            rows.positions = rows.positions + 1
            _mark_seen(rows.seen, rows.last)
            rows = settle(rows)
    return results  # type: ignore[return-value]


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
             batch_size: int = 8, progress: bool = True, desc: str = "generate", *,
             stop: StopRule | str | Sequence[str] | None = None, refill: bool = True, pack_weights: bool = True) -> list[str]:
    """Greedy continuations of already-rendered prompts, in input order, special tokens removed.

    Same outputs as `model.generate(do_sample=False)` per prompt (see the module docstring), cut
    after the stop when `stop` is given: `generate(..., stop=gsm8k_stop)`."""
    return [g.text for g in greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop=stop,
                                            refill=refill, progress=progress, desc=desc, pack_weights=pack_weights)]
