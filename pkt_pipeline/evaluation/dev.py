"""Dev-set scores for choosing hyperparameters, from transfer-split rows: never test items.

Tuning a method on MMLU test or GSM8K test would make the benchmark meaningless, so `pkt eval --dev`
scores a model on rows of the transfer splits instead: the `align` split (held out of every cache
pkt builds) or a slice of `train` past the examples a cache holds, written like a datasets split
slice: `mmlu/align`, `gsm/train[512:]`, `my.jsonl[:100]`.

Per row, one forward, no generation (a grid of runs is affordable on a CPU):
- `nll`: the teacher-forced mean NLL per token of the assistant reply given the chat-rendered user
  turn (`reference_nll`), for every row;
- `p_correct` and `correct`, for MMLU-style rows (the user turn is `mmlu.mmlu_prompt`'s layout, the
  reply names the letter, e.g. "The answer is: C"): the letter scored exactly as MMLU test is, with the
  reply's words before the letter as the answer prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..datasets import resolve_data
from ..jsonl import jsonl_records
from .mmlu import LETTERS, MmluItem, score_mmlu
from .reference_nll import reference_nll

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SLICE = re.compile(r"^(?P<source>.+?)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")
MMLU_HEADER = re.compile(r"^The following are multiple choice questions \(with answers\) about (?P<subject>.+)\.\n\n")
MMLU_REPLY = re.compile(r"^(?P<prefix>.*?)\s*\(?(?P<letter>[ABCD])\)?\.?\s*$", re.DOTALL)


@dataclass(frozen=True)
class DevRow:
    id: str
    prompt: str
    """The user turn."""
    reply: str
    """The reference assistant reply, the scored text."""


def load_dev_rows(references: list[str], data_dir: str = "data") -> list[DevRow]:
    """The rows of every `references` entry (TASK/SPLIT or .jsonl, with an optional [start:stop] slice).

    Ids are the rows' own `id`, else `<source>:<line>`; a repeated id is an error, since results pair by id.
    """
    rows: list[DevRow] = []
    for reference in references:
        match = SLICE.match(reference)
        source = match["source"] if match else reference
        numbered = list(jsonl_records(resolve_data(source, data_dir)))
        if match:
            numbered = numbered[slice(int(match["start"]) if match["start"] else None,
                                      int(match["stop"]) if match["stop"] else None)]
        for number, row in numbered:
            messages = row.get("messages") or []
            if len(messages) < 2 or messages[-2].get("role") != "user" or messages[-1].get("role") != "assistant":
                raise ValueError(f"{source}:{number}: a dev row needs `messages` ending in a user turn and its "
                                 "assistant reply")
            rows.append(DevRow(str(row.get("id") or f"{source}:{number}"), messages[-2]["content"],
                               messages[-1]["content"]))
    if not rows:
        raise ValueError(f"no dev rows in {references}")
    seen: set[str] = set()
    repeated = [row.id for row in rows if row.id in seen or seen.add(row.id)]
    if repeated:
        raise ValueError(f"dev rows repeat ids {repeated[:5]}: list each split slice once")
    return rows


def as_mmlu_item(row: DevRow) -> tuple[MmluItem, str] | None:
    """(the item, the reply's words before the letter) for an MMLU-style row, else None."""
    header, reply = MMLU_HEADER.match(row.prompt), MMLU_REPLY.match(row.reply.strip())
    if header is None or reply is None or not row.prompt.endswith("\nAnswer:"):
        return None
    body = row.prompt[header.end():-len("\nAnswer:")].split("\n")
    if len(body) < 5 or any(not line.startswith(f"{letter}. ") for letter, line in zip(LETTERS, body[-4:])):
        return None
    choices = tuple(line[3:] for line in body[-4:])
    item = MmluItem(row.id, header["subject"], "\n".join(body[:-4]), choices, LETTERS.index(reply["letter"]))
    return item, reply["prefix"]


def score_dev(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[DevRow], batch_size: int = 8,
              progress: bool = True) -> list[dict]:
    """Per row, in input order: {id, nll, tokens} and, for MMLU-style rows, {p_correct, correct}."""
    contexts = [tokenizer.apply_chat_template([{"role": "user", "content": row.prompt}], tokenize=False,
                                              add_generation_prompt=True) for row in rows]
    records = [{"id": row.id, **scored} for row, scored in
               zip(rows, reference_nll(model, tokenizer, contexts, [row.reply for row in rows], batch_size,
                                       progress, desc="dev nll"))]
    mmlu = [(index, parsed) for index, row in enumerate(rows) if (parsed := as_mmlu_item(row)) is not None]
    for prefix in sorted({parsed[1] for _, parsed in mmlu}):
        group = [(index, item) for index, (item, item_prefix) in mmlu if item_prefix == prefix]
        scored = score_mmlu(model, tokenizer, [item for _, item in group], batch_size, progress=progress,
                            answer_prefix=prefix)
        for (index, _), result in zip(group, scored):
            records[index].update(p_correct=result["p_correct"], correct=result["correct"])
    return records

