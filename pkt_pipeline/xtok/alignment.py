"""Align two tokenizations of one conversation at the character boundaries they share inside message contents.

Teacher and student render the same messages with their own chat templates, so the two texts differ in
template text (`<|im_start|>user\\n` against `<|user|>\\n`) and agree only on each message's content. A
position is therefore named in *content coordinates* `(message, character)`, and template text is never
aligned. A tokenization has a *cut* at `(m, j)` when one of its tokens ends right before content character
j of message m and the next token starts there (j = len(content): the content's end). A token that ends
inside a multi-byte character the next token finishes (byte-level BPE gives both the character's span) makes
no cut. Characters no token covers (a tokenizer that drops spaces) are cuts all the way through.

The shared cuts give
- `pairs`: (teacher token, student token) that end at the same content character: both models have read
  exactly the same content there, so their next-token distributions predict the same continuation;
- `chunks`: between two consecutive shared cuts of one message, the teacher's tokens and the student's
  tokens covering exactly the same content characters (and nothing else): the unit over which
  sequence likelihoods of the two models can be compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Cut = tuple[int, int]
"""(message index, character index in its content)."""


@dataclass(frozen=True)
class Alignment:
    """The aligned positions of two tokenizations (token indices into each sequence)."""

    pairs: np.ndarray
    """[P, 2] int64 (teacher token, student token): both end at the same content character, in text order."""
    pair_messages: np.ndarray
    """[P] int64: the message each pair lies in."""
    chunks: np.ndarray
    """[C, 4] int64 (teacher start, teacher stop, student start, student stop): half-open token ranges that
    cover the same content characters of one message, in text order."""
    chunk_messages: np.ndarray
    """[C] int64: the message each chunk lies in."""


def content_cuts(spans: np.ndarray, contents: Sequence[tuple[int, int]], complete: bool = True) -> dict[Cut, int]:
    """{(message, character): the index of the token before the cut} of one tokenization.

    `spans` [T, 2] are the tokens' character spans [start, end) in the rendered text, `contents` each
    message's content span in that text. The index is -1 for a cut before the first token. With
    `complete=False` (a truncated sequence) the end of the last token is no cut: the token cut off after
    it might have finished its character. Zero-width tokens (special tokens some tokenizers give no
    characters) belong to the side before the cut they sit at."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    real = np.flatnonzero(spans[:, 1] > spans[:, 0])
    cuts: dict[Cut, int] = {}
    if not len(real):
        return cuts
    # (first position, last position, the token before): a cut at every position of [first, last]
    runs = [(int(spans[real[0], 0]), int(spans[real[0], 0]), int(real[0]) - 1)]
    for position, token in enumerate(real):
        end = int(spans[token, 1])
        if position + 1 < len(real):
            following = int(real[position + 1])
            if spans[following, 0] >= end:
                runs.append((end, int(spans[following, 0]), following - 1))
        elif complete:
            runs.append((end, end, len(spans) - 1))
    for first, last, token in runs:
        for message, (start, stop) in enumerate(contents):
            for position in range(max(first, start), min(last, stop) + 1):
                cuts.setdefault((message, position - start), token)
    return cuts


def align_spans(teacher_spans: np.ndarray, teacher_contents: Sequence[tuple[int, int]], student_spans: np.ndarray,
                student_contents: Sequence[tuple[int, int]], teacher_complete: bool = True,
                student_complete: bool = True) -> Alignment:
    """The pairs and chunks of two tokenizations of the same messages (module docstring).

    `*_spans` [T, 2] / [S, 2]: token character spans in each side's own rendered text; `*_contents`: each
    message's content span in that text (`sources.content_spans`), the same number of messages on both sides
    and each content the same string. `*_complete=False` marks a truncated sequence."""
    if len(teacher_contents) != len(student_contents):
        raise ValueError(f"the teacher's render has {len(teacher_contents)} messages, the student's "
                         f"{len(student_contents)}: they must render the same conversation")
    for message, (t, s) in enumerate(zip(teacher_contents, student_contents)):
        if t[1] - t[0] != s[1] - s[0]:
            raise ValueError(f"message {message}'s content is {t[1] - t[0]} characters in the teacher's render and "
                             f"{s[1] - s[0]} in the student's: the two renders hold different text")
    teacher = content_cuts(teacher_spans, teacher_contents, teacher_complete)
    student = content_cuts(student_spans, student_contents, student_complete)
    shared = sorted(teacher.keys() & student.keys())
    pairs: dict[tuple[int, int], int] = {}
    chunks: list[tuple[int, int, int, int, int]] = []
    previous: tuple[int, int, int] | None = None  # (message, teacher token, student token) of the last chunk's end
    for message, character in shared:
        t, s = teacher[(message, character)], student[(message, character)]
        if character >= 1 and t >= 0 and s >= 0:
            pairs.setdefault((t, s), message)
        if previous is None or previous[0] != message:
            previous = (message, t, s)
        elif t > previous[1] and s > previous[2]:
            chunks.append((previous[1] + 1, t + 1, previous[2] + 1, s + 1, message))
            previous = (message, t, s)
    pair_array = np.array(list(pairs), dtype=np.int64).reshape(-1, 2)
    chunk_array = np.array(chunks, dtype=np.int64).reshape(-1, 5)
    return Alignment(pairs=pair_array, pair_messages=np.array(list(pairs.values()), dtype=np.int64),
                     chunks=chunk_array[:, :4], chunk_messages=chunk_array[:, 4])
