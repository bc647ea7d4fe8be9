"""MMLU, 0-shot, scored by the log-likelihood of the answer letter.

Prompt (the standard MMLU layout, and exactly the user turn of pkt's `mmlu` transfer split):

    The following are multiple choice questions (with answers) about {subject}.

    {question}
    A. {choice 0}
    B. {choice 1}
    C. {choice 2}
    D. {choice 3}
    Answer:

With `chat=True` this text is the user turn, rendered by the tokenizer's chat template with the
generation prompt, so the model is read at the first token of its reply; `answer_prefix` is
appended after the generation prompt (e.g. "The answer is:", the reply format of the transfer
split). With `chat=False` the text is scored as is (base models).

The prediction compares, at the last prompt position, the next-token log-probabilities of the
letters. A letter may be spelt "A" or " A" and a tokenizer may give the two different ids (or
split " A" into two tokens): every spelling that is a single token counts, and the letter's
score is the logsumexp over them, i.e. the probability that the next token spells that letter
either way, a true log-probability (max would under-count a letter the model spreads over both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..jsonl import jsonl_records
from ..models import input_device
from .batching import left_padded, pad_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LETTERS = ("A", "B", "C", "D")
LETTER_SPELLINGS = ("{}", " {}")


@dataclass(frozen=True)
class MmluItem:
    id: str
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices / LETTERS


def load_mmlu(path: str | Path, limit: int | None = None) -> list[MmluItem]:
    """Items of an MMLU jsonl (`question`, `answer_a..answer_d`, `correct_answer` A-D, `topic`).

    The file has no ids, so an item's id is its subject and its index within that subject in
    file order (`college_biology_3`), stable as long as the file is. The pkt copy holds two stray
    CSV header rows (`"question": "question"`, `"correct_answer": "answer"`): those are skipped,
    leaving the standard 14,042 items.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMLU file not found: {path}")
    items: list[MmluItem] = []
    per_subject: dict[str, int] = {}
    for line_no, row in jsonl_records(path):
        if row.get("question") == "question" and row.get("correct_answer") == "answer":
            continue
        try:
            subject = row["topic"].strip()
            choices = tuple(str(row[f"answer_{letter.lower()}"]) for letter in LETTERS)
            answer = LETTERS.index(row["correct_answer"].strip().upper())
            question = row["question"]
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}:{line_no}: not an MMLU row (need question, answer_a..answer_d, "
                             f"correct_answer in A-D, topic): {error!r}") from None
        key = subject.replace(" ", "_")
        index = per_subject.get(key, 0)
        per_subject[key] = index + 1
        items.append(MmluItem(f"{key}_{index}", subject, question, choices, answer))
        if limit is not None and len(items) >= limit:
            break
    return items


def mmlu_prompt(item: MmluItem) -> str:
    """The 0-shot question text (the user turn), ending in "Answer:"."""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices))
    subject = item.subject.replace("_", " ")
    return (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            f"{item.question}\n{options}\nAnswer:")


def mmlu_item_text(item: MmluItem) -> str:
    """Question and options, the text a decontamination check should look for in training data:
    the question alone is often too generic ("Which of the following is true?")."""
    return item.question + "\n" + "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices))


def render_prompt(item: MmluItem, tokenizer: PreTrainedTokenizerBase, chat: bool = True,
                  answer_prefix: str = "") -> str:
    """The exact text fed to the model: chat-templated for instruct models, raw otherwise."""
    text = mmlu_prompt(item)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text + answer_prefix


def letter_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """For each letter, the ids of its single-token spellings ("A", " A"), deduplicated."""
    ids = []
    for letter in LETTERS:
        variants = []
        for spelling in LETTER_SPELLINGS:
            encoded = tokenizer.encode(spelling.format(letter), add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in variants:
                variants.append(encoded[0])
        if not variants:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no single token for answer letter {letter!r}")
        ids.append(variants)
    return ids


def letter_logprobs(logprobs: torch.Tensor, letter_ids: list[list[int]]) -> torch.Tensor:
    """[B, vocab] next-token log-probs -> [B, 4] letter log-probs (logsumexp over spellings)."""
    width = max(len(v) for v in letter_ids)
    index = torch.tensor([v + v[:1] * (width - len(v)) for v in letter_ids], device=logprobs.device)  # [4, width]
    valid = torch.tensor([[i < len(v) for i in range(width)] for v in letter_ids], device=logprobs.device)
    gathered = logprobs[:, index].masked_fill(~valid, float("-inf"))  # [B, 4, width]
    return gathered.logsumexp(-1)


@torch.no_grad()
def score_mmlu(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[MmluItem], batch_size: int = 8,
               chat: bool = True, progress: bool = True, answer_prefix: str = "") -> list[dict]:
    """Predict each item's letter; returns, in input order, one dict per item:
    {id, subject, prompt, prediction, answer, correct, letter_logprobs {letter: float}, p_correct,
    log_p_correct}.

    `p_correct` is the probability of the correct letter renormalised over the four letters
    (softmax of `letter_logprobs`): a continuous score of the same forward pass, which moves with
    every change of the model's belief where accuracy moves only when the argmax flips, so it
    separates two models on far fewer items.

    Prompts are batched shortest-first (less padding) and left-padded, so every row's last real
    token is the final column; position ids come from the attention mask so padded rows see the
    same positions as an unbatched forward, and only that column's logits are computed.
    """
    from tqdm.auto import tqdm

    letter_ids = letter_token_ids(tokenizer)
    pad_id = pad_token_id(tokenizer)
    device = input_device(model)
    prompts = [render_prompt(item, tokenizer, chat, answer_prefix) for item in items]
    # A chat template writes its own BOS; a raw prompt needs the tokenizer's.
    encoded = [tokenizer.encode(p, add_special_tokens=not chat) for p in prompts]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    scores: list[torch.Tensor | None] = [None] * len(items)
    for start in tqdm(range(0, len(order), batch_size), desc="mmlu", unit="batch", disable=not progress):
        rows = order[start:start + batch_size]
        input_ids, attention_mask, position_ids = left_padded([encoded[i] for i in rows], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=position_ids.to(device), logits_to_keep=1).logits[:, -1]
        batch_scores = letter_logprobs(logits.float().log_softmax(-1), letter_ids).cpu()
        for r, i in enumerate(rows):
            scores[i] = batch_scores[r]
    results = []
    for item, prompt, score in zip(items, prompts, scores):
        prediction = int(score.argmax())
        log_p_correct = float(score.double().log_softmax(-1)[item.answer])  # over the 4 letters
        results.append({
            "id": item.id,
            "subject": item.subject,
            "prompt": prompt,
            "prediction": LETTERS[prediction],
            "answer": LETTERS[item.answer],
            "correct": prediction == item.answer,
            "letter_logprobs": {letter: float(value) for letter, value in zip(LETTERS, score)},
            "p_correct": math.exp(log_p_correct),
            "log_p_correct": log_p_correct,
        })
    return results

