"""Turn transfer-split rows (chat `messages`) into token ids with a supervision mask.

The mask says which positions carry the LM loss (HF labels: `label[t] = input_ids[t]` where
`supervised[t]`, else -100). It is computed from character spans of the rendered text mapped
onto the tokens of the *whole* text through the tokenizer's offsets, so `input_ids` are exactly
what the model would see for the conversation and no fragment is tokenised on its own.

Every example carries a content hash of its messages, and `dataset_fingerprint` hashes those
with the prompt settings, so a cache built from one data set is never mistaken for another.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .jsonl import jsonl_lines, jsonl_records  # noqa: F401  (jsonl_lines: its home before jsonl.py)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROMPT_FORMATS = ("chat", "plain")

# Part of every fingerprint: bump it when the text or the mask an example gets changes, so
# caches built by an older rule are not reused.
EXAMPLE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Example:
    """One tokenised conversation; `supervised[t]` marks the positions the loss is computed on,
    `answer[t]` the reply tokens (the same unless `train_on_inputs` supervises every token)."""

    example_id: str
    content_hash: str
    input_ids: np.ndarray
    supervised: np.ndarray
    truncated: bool
    answer: np.ndarray
    text: str = ""
    """The rendered conversation the tokens were cut from (the chat template's or the plain format's)."""
    offsets: np.ndarray | None = None
    """[T, 2] int32: each token's character span [start, end) in `text` (the fast tokenizer's offset mapping)."""
    messages: str = ""
    """The row's messages as canonical JSON (what `content_hash` hashes): a student re-renders them with its template."""


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(messages: list) -> str:
    """sha256 of the canonical JSON of `messages`: equal for equal conversations, whatever the row's other fields."""
    return hashlib.sha256(_canonical_json(messages).encode("utf-8")).hexdigest()


def read_jsonl_rows(path: str | Path) -> list[dict]:
    """The rows of a jsonl file of chat `messages`, each checked, blank lines skipped.

    A bad row is reported with its file and line number here, before any tokenising, so a
    broken data file fails in a second rather than after a teacher has been loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    for line_number, row in jsonl_records(path):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise ValueError(f'{path}:{line_number}: expected a JSON object with a "messages" list')
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no examples")
    return rows


def format_example(
    row: dict,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str = "chat",
    max_length: int = 1024,
    train_on_inputs: bool = False,
    example_id: str = "",
) -> Example:
    """Tokenise one row and mark the tokens the loss is computed on.

    `example_id` is `row["id"]` when the row has one, else the `example_id` argument.

    Prompt formats:

    - `"chat"`: the tokenizer's chat template over the whole conversation (any default system
      prompt the template adds included). Supervised: the content of every assistant turn plus
      the end-of-turn token that closes it (`<|im_end|>` for ChatML), since that token is what
      teaches the model to stop; whatever the template writes after it (ChatML's "\\n") is not.
      The answer spans are found by rendering the conversation up to each assistant turn with
      `add_generation_prompt=True`: everything the template adds after that prompt and before
      the end-of-turn token (e.g. an empty think block) is part of the answer.
    - `"plain"`: the format of the published parametric-transfer papers,
      `f"User: {user}\\nAssistant: {answer}" + eos_token`. System turns are written as their
      content + "\\n" where they stand (so a leading system turn is prepended); a later turn
      follows the previous answer's eos after a "\\n". Supervised: `" " + answer + eos`. The space
      after "Assistant:" counts as part of the answer because BPE tokenizers fuse it with the
      answer's first word (" Answer" is one token); the generation prompt is then
      `"...\\nAssistant:"`, with no trailing space.

    A token that straddles a span boundary is supervised if any of its characters lie in the
    answer. With `train_on_inputs=True` every token is supervised, position 0 included (HF's
    label shift never computes a loss there anyway).

    Longer examples keep their first `max_length` tokens, so the tail of the answer is cut (and
    with it the end-of-turn token); `truncated` is then True. An example may be left with no
    supervised token; it is returned all the same and the caller decides.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {prompt_format!r}; expected one of {', '.join(PROMPT_FORMATS)}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if row.get("id") is not None:
        example_id = str(row["id"])
    messages = row.get("messages")
    _check_messages(messages, example_id)
    if prompt_format == "chat":
        text, turns = _render_chat(messages, tokenizer, example_id)
    else:
        text, turns = _render_plain(messages, tokenizer, example_id)
    input_ids, answer, offsets = _tokenise_with_mask(text, turns, tokenizer, example_id)
    supervised = np.ones_like(answer) if train_on_inputs else answer.copy()
    truncated = len(input_ids) > max_length
    if truncated:
        input_ids, supervised, answer = input_ids[:max_length], supervised[:max_length], answer[:max_length]
        offsets = offsets[:max_length]
    return Example(
        example_id=example_id,
        content_hash=content_hash(messages),
        input_ids=input_ids,
        supervised=supervised,
        truncated=truncated,
        answer=answer,
        text=text,
        offsets=offsets,
        messages=_canonical_json(messages),
    )


def render_text(messages: list[dict], tokenizer: PreTrainedTokenizerBase, prompt_format: str = "chat",
                example_id: str = "") -> str:
    """The text `format_example` tokenises for `messages` (checked as it checks them)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {prompt_format!r}; expected one of {', '.join(PROMPT_FORMATS)}")
    _check_messages(messages, example_id)
    render = _render_chat if prompt_format == "chat" else _render_plain
    return render(messages, tokenizer, example_id)[0]


def load_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: str = "chat",
    max_length: int = 1024,
    train_on_inputs: bool = False,
    limit: int | None = None,
) -> tuple[list[Example], dict]:
    """The first `limit` rows of a jsonl file (all when None) as examples, with counts for the manifest.

    Rows without an `id` are named `{file stem}-{row index:06d}` (0-based, blank lines not
    counted), which stays stable as long as the file does. The counts are
    `{"examples", "tokens", "supervised_tokens", "truncated"}`; truncation is logged once as a
    warning, because a cut answer silently weakens what the student learns.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {prompt_format!r}; expected one of {', '.join(PROMPT_FORMATS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}")
    path = Path(path)
    rows = read_jsonl_rows(path)
    if limit is not None:
        rows = rows[:limit]
    stem = path.name.removesuffix(".jsonl")
    examples = [
        format_example(row, tokenizer, prompt_format, max_length, train_on_inputs, example_id=f"{stem}-{index:06d}")
        for index, row in enumerate(rows)
    ]
    truncated = [e for e in examples if e.truncated]
    stats = {
        "examples": len(examples),
        "tokens": int(sum(len(e.input_ids) for e in examples)),
        "supervised_tokens": int(sum(int(e.supervised.sum()) for e in examples)),
        "truncated": len(truncated),
    }
    if truncated:
        empty = sum(1 for e in truncated if not e.supervised.any())
        logger.warning(
            "%d of %d examples in %s are longer than max_length=%d tokens and were truncated "
            "(the tail of the answer is cut; %d have no supervised token left)",
            len(truncated), len(examples), path, max_length, empty,
        )
    return examples, stats


def dataset_fingerprint(examples: list[Example], settings: dict) -> str:
    """sha256 over the settings and each example's id and content hash, in order.

    Token ids are left out on purpose: they follow from the content, the settings and the
    tokenizer, which the cache identifies on its own. The example format version is included,
    so a change to how examples are built invalidates old fingerprints.
    """
    digest = hashlib.sha256()
    header = {"example_format_version": EXAMPLE_FORMAT_VERSION, "settings": settings}
    digest.update(_canonical_json(header).encode("utf-8"))
    for example in examples:
        digest.update(b"\n")
        digest.update(_canonical_json([example.example_id, example.content_hash]).encode("utf-8"))
    return digest.hexdigest()


def _name(example_id: str) -> str:
    return f"example {example_id!r}" if example_id else "an example without an id"


def _check_messages(messages, example_id: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{_name(example_id)} has no "messages"')
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{_name(example_id)}: message {index} needs a string role and a string content")
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{_name(example_id)} ends with a {messages[-1]['role']!r} turn; "
            "the last turn must be the assistant's answer"
        )


# A turn's answer: characters [start, content_end) are supervised, and so is the first special
# token that starts in [content_end, turn_end) (the end-of-turn token), when there is one.
_Turn = tuple[int, int, int]


def _render_chat(messages: list[dict], tokenizer: PreTrainedTokenizerBase, example_id: str) -> tuple[str, list[_Turn]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template; use prompt_format='plain' for this model"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    turns = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(prompt)) or (turns and len(prompt) < turns[-1][2]):
            raise ValueError(
                f"{_name(example_id)}: the chat template does not render the conversation up to "
                f"assistant turn {index} as a prefix of the whole conversation, so the answer "
                "tokens cannot be located; use prompt_format='plain' for this model"
            )
        content = message["content"]
        position = through.find(content, len(prompt))
        if position < 0 and content.strip():
            content = content.strip()
            position = through.find(content, len(prompt))
        if position < 0:
            raise ValueError(
                f"{_name(example_id)}: the chat template does not write assistant turn {index} verbatim, "
                "so its tokens cannot be located"
            )
        turns.append((len(prompt), position + len(content), len(through)))
    return text, turns


def _render_plain(messages: list[dict], tokenizer: PreTrainedTokenizerBase, example_id: str) -> tuple[str, list[_Turn]]:
    eos = tokenizer.eos_token
    if not eos:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token, which ends answers in the plain prompt format")
    text, turns = "", []
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if index and messages[index - 1]["role"] == "assistant":
            text += "\n"
        if role == "system":
            text += f"{content}\n"
        elif role == "user":
            text += f"User: {content}\n"
        elif role == "assistant":
            text += "Assistant:"
            start = len(text)
            text += f" {content}{eos}"
            turns.append((start, len(text), len(text)))
        else:
            raise ValueError(f"{_name(example_id)}: the plain prompt format has no place for a {role!r} turn")
    return text, turns


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    return ids


def _tokenise_with_mask(text: str, turns: list[_Turn], tokenizer: PreTrainedTokenizerBase,
                        example_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; answer masks need its character offsets")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = np.asarray(encoding["input_ids"], dtype=np.int32)
    starts = np.asarray([s for s, _ in encoding["offset_mapping"]], dtype=np.int64)
    ends = np.asarray([e for _, e in encoding["offset_mapping"]], dtype=np.int64)
    special = np.isin(input_ids, np.fromiter(_special_ids(tokenizer), dtype=np.int64))
    supervised = np.zeros(len(input_ids), dtype=bool)
    for start, content_end, turn_end in turns:
        after_start = np.flatnonzero(ends > start)
        first = int(after_start[0]) if len(after_start) else len(input_ids)
        closing = np.flatnonzero(special & (starts >= content_end) & (starts < turn_end))
        if len(closing):
            stop = int(closing[0]) + 1
        else:
            before_end = np.flatnonzero(starts < content_end)
            stop = int(before_end[-1]) + 1 if len(before_end) else 0
        supervised[first:stop] = True
    offsets = np.stack([starts, ends], axis=1).astype(np.int32) if len(input_ids) else np.zeros((0, 2), np.int32)
    return input_ids, supervised, offsets
