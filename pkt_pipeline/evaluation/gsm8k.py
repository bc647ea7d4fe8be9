"""GSM8K, 0-shot: the prompt, and reading the final number out of a model's (or the reference) answer.

Prompt (the user turn; generation is greedy chain-of-thought):

    Answer the following question. Think step by step, then end with "So the answer is N.",
    where N is the final number.

    Question: {question}

It starts like the user turn of pkt's `gsm` transfer split ("Answer the following question.\\n\\n
Question: ..."), whose answers end "So the answer is 24.", so a student trained on that split sees
a familiar prompt and an untrained instruct model is told the format the extractor reads best.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from ..jsonl import jsonl_records

GSM8K_INSTRUCTION = ('Answer the following question. Think step by step, then end with "So the answer is N.", '
                     "where N is the final number.")

# A number as written in answers: optional sign (not a minus between two operands: "16-3"),
# optional currency, thousands separators, decimals. Commas must group by three so "2,3" is two numbers.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])(?P<sign>[-\u2212])\s*)?[$\u20ac\u00a3]?\s*(?P<sign2>-)?"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
)
# Phrases after which the final answer is stated; the last one in the text wins.
_MARKER = re.compile(r"####|answer\s*(?:is|:)|\\boxed\{", re.IGNORECASE)


@dataclass(frozen=True)
class GsmItem:
    id: str
    question: str
    answer: str  # the reference solution, ending "#### N"
    reference: str  # N, canonical (see canonical_number)


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[GsmItem]:
    """Items of a GSM8K jsonl (`question`, `answer`); ids are `gsm8k_{line index}`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path}")
    items: list[GsmItem] = []
    for line_no, row in jsonl_records(path):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}:{line_no}: not a GSM8K row (need question and answer), got keys {sorted(row)}")
        reference = extract_final_number(row["answer"])
        if reference is None:
            raise ValueError(f"{path}:{line_no}: reference answer has no final number: {row['answer'][-80:]!r}")
        items.append(GsmItem(f"gsm8k_{len(items)}", row["question"], row["answer"], reference))
        if limit is not None and len(items) >= limit:
            break
    return items


def gsm8k_prompt(question: str) -> str:
    """The 0-shot user turn for one question."""
    return f"{GSM8K_INSTRUCTION}\n\nQuestion: {question.strip()}"


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def reference_reply(item: GsmItem) -> str:
    """The reference solution as the reply pkt's `gsm` transfer split teaches: "Answer: " + the
    reasoning lines joined by spaces, calculator annotations (`<<48/2=24>>`) removed, ending
    "So the answer is N." instead of "#### N". Its teacher-forced NLL is GSM8K's continuous metric."""
    reasoning, _, _ = item.answer.rpartition("####")
    steps = " ".join(line.strip() for line in _CALCULATOR.sub("", reasoning).splitlines() if line.strip())
    return f"Answer: {steps} So the answer is {item.reference}."


def canonical_number(text: str) -> str:
    """A plain decimal string: no separators, no trailing zeros ("1,200.50" -> "1200.5", "-0" -> "0")."""
    value = Decimal(text.replace(",", "")).normalize()
    if value == 0:
        return "0"
    return format(value, "f")


def _numbers(text: str) -> list[str]:
    found = []
    for match in _NUMBER.finditer(text):
        negative = bool(match["sign"] or match["sign2"])
        found.append(canonical_number(("-" if negative else "") + match["body"]))
    return found


def extract_final_number(text: str) -> str | None:
    """The answer number of a solution text, canonical (see `canonical_number`), or None.

    The first number after the last answer marker ("####", "answer is", "answer:", "\\boxed{")
    wins; without a marker followed by a number, the last number in the text.
    """
    markers = list(_MARKER.finditer(text))
    if markers:
        after = _numbers(text[markers[-1].end():])
        if after:
            return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def numbers_match(a: str | None, b: str | None) -> bool:
    """Numeric equality of two answers ("3.50" == "3.5", "$1,200" == "1200"); None matches nothing."""
    if a is None or b is None:
        return False
    a_number, b_number = extract_final_number(a), extract_final_number(b)
    if a_number is None or b_number is None:
        return False
    return Decimal(a_number) == Decimal(b_number)


def gsm8k_correct(generated: str, item: GsmItem) -> bool:
    """Whether a generated solution's final number equals the item's reference."""
    return numbers_match(extract_final_number(generated), item.reference)
