"""Find test items the model saw during transfer, so evaluations can drop them and say how many.

Rule (the common n-gram overlap check, as in GPT-3 / lm-eval decontamination): both sides are
normalised (`normalise`), then a test item is contaminated by a transfer example when
  - its whole normalised text occurs in the example's normalised user message, word-aligned, or
  - the two share a run of `ngram` (13) consecutive words that is not boilerplate.
An n-gram is boilerplate when more than `max_item_frequency` of the test items contain it: MMLU's
895 "moral scenarios" items open with the same 35-word stem and would all match any transfer row
of that subject. Passages shared by a few test questions stay evidence (seeing the passage in
training counts). Only user messages are searched: a copied test question would sit there.
The containment check runs against the examples sharing any n-gram with the item (all examples
for items shorter than `ngram` words), so exact copies are caught even when boilerplate.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..jsonl import jsonl_records

_NON_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class Match:
    test_id: str
    transfer_file: str
    transfer_id: str  # the row's `id`, else "line N"
    rule: str  # "contained" or "{n}-gram"
    evidence: str  # the shared normalised text


def normalise(text: str) -> str:
    """Lowercase, NFKC, every run of punctuation/whitespace -> one space, stripped.

    Punctuation becomes a space rather than vanishing so that "A.polydactyly" and "A. polydactyly"
    agree; both sides go through the same function, so "don't" -> "don t" matches itself.
    """
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def _user_messages(path: Path) -> list[tuple[str, str]]:
    """(id, normalised user text) for every row of a transfer jsonl."""
    out = []
    for line_no, row in jsonl_records(path):
        if not isinstance(row.get("messages"), list):
            raise ValueError(f"{path}:{line_no}: transfer row has no `messages` list")
        text = "\n".join(m["content"] for m in row["messages"] if m.get("role") == "user")
        out.append((str(row.get("id", f"line {line_no}")), normalise(text)))
    return out


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def find_contamination(test_items: dict[str, str], transfer_files: list[Path], ngram: int = 13,
                       max_item_frequency: int = 10) -> dict[str, Match]:
    """{test id: the first transfer example that contaminates it} (see the module rule)."""
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    examples = []
    for path in map(Path, transfer_files):
        if not path.is_file():
            raise FileNotFoundError(f"transfer file not found: {path}")
        examples += [(str(path), example_id, text) for example_id, text in _user_messages(path)]
    index: dict[tuple[str, ...], list[int]] = {}
    for e, (_, _, text) in enumerate(examples):
        for gram in set(_ngrams(text.split(), ngram)):
            index.setdefault(gram, []).append(e)
    tests = {test_id: normalise(raw).split() for test_id, raw in test_items.items()}
    frequency = Counter(gram for words in tests.values() for gram in set(_ngrams(words, ngram)))

    matches: dict[str, Match] = {}
    for test_id, words in tests.items():
        if not words:
            continue
        grams = [g for g in _ngrams(words, ngram) if g in index]
        candidates = sorted({e for g in grams for e in index[g]}) if len(words) >= ngram else range(len(examples))
        needle = f" {' '.join(words)} "
        hit = next((e for e in candidates if needle in f" {examples[e][2]} "), None)
        if hit is not None:
            matches[test_id] = Match(test_id, examples[hit][0], examples[hit][1], "contained", needle.strip())
            continue
        gram = next((g for g in grams if frequency[g] <= max_item_frequency), None)
        if gram is not None:
            path, example_id, _ = examples[index[gram][0]]
            matches[test_id] = Match(test_id, path, example_id, f"{ngram}-gram", " ".join(gram))
    return matches


def contaminated_ids(test_items: dict[str, str], transfer_files: list[Path], ngram: int = 13,
                     max_item_frequency: int = 10) -> set[str]:
    """Ids of the test items that appear in any transfer file (`find_contamination` has which example)."""
    return set(find_contamination(test_items, transfer_files, ngram, max_item_frequency))


def declared_test_ids(transfer_files: list[Path], task: str) -> set[str]:
    """Test item ids that transfer rows declare as their source (`"test_item_id"`, with `"test_task"`)."""
    declared = set()
    for path in transfer_files:
        for _, row in jsonl_records(path):
            if "test_item_id" in row and row.get("test_task") == task:
                declared.add(str(row["test_item_id"]))
    return declared
