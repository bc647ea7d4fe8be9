"""The shared-string vocabulary of two tokenizers: the token ids whose decoded strings are identical.

A token is identified by what it decodes to on its own (`tokenizer.decode([id])`, special tokens kept). Left out
on each side: a string with U+FFFD (the token is a byte fragment of a character, so equal strings need not be
equal bytes), an empty string, and a string that several ids of that vocabulary decode to (no single row stands
for it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SharedVocabulary:
    """Pairs of token ids, one per shared string, in the student's id order."""

    teacher_ids: np.ndarray
    """[N] int64 rows of the teacher's LM head."""
    student_ids: np.ndarray
    """[N] int64 rows of the student's LM head, the same strings as `teacher_ids`."""
    teacher_size: int
    student_size: int

    def __len__(self) -> int:
        return len(self.teacher_ids)

    def summary(self) -> dict:
        """The overlap and its share of each vocabulary, as runs report it."""
        shared = len(self)
        return {"shared_tokens": shared, "teacher_vocab": self.teacher_size, "student_vocab": self.student_size,
                "teacher_share": round(shared / max(self.teacher_size, 1), 6),
                "student_share": round(shared / max(self.student_size, 1), 6)}


def token_strings(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """{decoded string: its id} of every token that decodes to a string of its own (module docstring)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    owners: dict[str, list[int]] = {}
    for token_id, text in enumerate(texts):
        if text and "\ufffd" not in text:
            owners.setdefault(text, []).append(token_id)
    return {text: ids[0] for text, ids in owners.items() if len(ids) == 1}


def shared_vocabulary(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> SharedVocabulary:
    """The ids of the strings both tokenizers decode a single token to."""
    theirs, ours = token_strings(teacher), token_strings(student)
    pairs = sorted((ours[text], theirs[text]) for text in ours.keys() & theirs.keys())
    student_ids, teacher_ids = (np.array(ids, dtype=np.int64) for ids in zip(*pairs)) if pairs else (
        np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    return SharedVocabulary(teacher_ids, student_ids, len(teacher), len(student))
