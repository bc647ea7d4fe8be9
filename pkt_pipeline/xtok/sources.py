"""The student's side of a cached example: render its source with the student's own template, tokenise it,
and align the result with the teacher's cached tokens (`alignment.align_spans`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ..examples import format_example, render_text
from .alignment import Alignment, align_spans

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..cache import Cache

_MARK = "\ue000{}\ue001"
_MARKS = re.compile("\ue000(\\d+)\ue001")


def content_spans(messages: list[dict], tokenizer: PreTrainedTokenizerBase, prompt_format: str,
                  text: str) -> list[tuple[int, int]]:
    """Each message's content span [start, stop) in `text`, the render of `messages` by `tokenizer`.

    The conversation is rendered once more with every content replaced by a private-use marker: what lies
    between the markers is the template's own text, so the contents are located by walking `text` through
    it, never by searching for a content string (a short content such as "user" also occurs in template
    text). A template that trims contents is followed (the stripped content is tried second)."""
    marked = [{**message, "content": _MARK.format(index)} for index, message in enumerate(messages)]
    skeleton = render_text(marked, tokenizer, prompt_format)
    found = _MARKS.findall(skeleton)
    name = type(tokenizer).__name__
    if found != [str(index) for index in range(len(messages))]:
        raise ValueError(f"the {prompt_format} render of {name} does not write each message's content once, in order "
                         f"(it wrote message contents {found}), so the contents cannot be located for alignment")
    pieces = _MARKS.split(skeleton)[::2]  # template text before, between and after the contents
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        if not text.startswith(pieces[index], cursor):
            raise ValueError(f"the {prompt_format} render of {name} differs from the text given before message "
                             f"{index}'s content; the text was not rendered by this tokenizer's template")
        cursor += len(pieces[index])
        content = message["content"]
        for candidate in dict.fromkeys((content, content.strip())):
            if text.startswith(candidate, cursor) and text.startswith(pieces[index + 1], cursor + len(candidate)):
                spans.append((cursor, cursor + len(candidate)))
                cursor += len(candidate)
                break
        else:
            raise ValueError(f"the {prompt_format} render of {name} does not write message {index}'s content "
                             "verbatim, so it cannot be aligned")
    if cursor + len(pieces[-1]) != len(text):
        raise ValueError(f"the {prompt_format} render of {name} differs from the text given after the last message")
    return spans


@dataclass(frozen=True)
class AlignedExample:
    """A cached example as the student sees it: its own token ids and masks, aligned with the teacher's tokens."""

    example_id: str
    input_ids: np.ndarray
    """[S] int32, the student's tokens of the example's conversation in the student's template."""
    supervised: np.ndarray
    """[S] bool: the student's tokens the loss sees, by the cache's prompt settings (`train_on_inputs`)."""
    answer: np.ndarray
    """[S] bool: the student's reply tokens."""
    alignment: Alignment
    """Teacher token index (into the cached rows) <-> student token index (into `input_ids`)."""


def align_example(example_id: str, messages: list[dict], teacher_text: str, teacher_spans: np.ndarray,
                  teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase,
                  prompt_format: str = "chat", max_length: int = 1024, train_on_inputs: bool = False,
                  teacher_truncated: bool = False) -> AlignedExample:
    """Tokenise `messages` as the student would be trained on them and align with the teacher's `teacher_spans`
    [T, 2] (character spans in `teacher_text`)."""
    student = format_example({"messages": messages}, student_tokenizer, prompt_format, max_length, train_on_inputs,
                             example_id=example_id)
    alignment = align_spans(teacher_spans, content_spans(messages, teacher_tokenizer, prompt_format, teacher_text),
                            student.offsets, content_spans(messages, student_tokenizer, prompt_format, student.text),
                            teacher_complete=not teacher_truncated, student_complete=not student.truncated)
    return AlignedExample(example_id, student.input_ids, student.supervised, student.answer, alignment)


def align_cache(cache: Cache, student_tokenizer: PreTrainedTokenizerBase, who: str = "a cross-tokenizer method",
                progress: bool = False) -> dict[str, AlignedExample]:
    """Every cached example, tokenised by the student with the cache's prompt settings and aligned with the
    teacher's cached tokens. Refuses a cache without the sources (`Cache.require_cross_tokenizer`) naming `who`."""
    cache.require_cross_tokenizer(who)
    teacher_tokenizer = cache.teacher_tokenizer()
    prompt = cache.manifest.prompt
    columns = cache.index.select(["example_id", "truncated"]).to_pydict()
    aligned = {}
    for example_id, truncated in tqdm(list(zip(columns["example_id"], columns["truncated"])), desc="align tokens",
                                      unit="ex", disable=not progress):
        messages, text = cache.source(example_id)
        try:
            aligned[example_id] = align_example(example_id, messages, text, cache.spans(example_id), teacher_tokenizer,
                                                student_tokenizer, prompt.format, prompt.max_length,
                                                prompt.train_on_inputs, bool(truncated))
        except ValueError as error:
            raise ValueError(f"cached example {example_id!r}: {error}") from None
    return aligned
