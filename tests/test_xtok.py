"""The cross-tokenizer alignment (`pkt_pipeline.xtok`): hand strings with hand-written token spans, and real
tokenizers with different vocabularies and chat templates."""

from __future__ import annotations

import numpy as np
import pytest

from pkt_pipeline.examples import format_example
from pkt_pipeline.tiny_models import OTHER_SPECIAL_TOKENS, OTHER_TEMPLATE, build_tokenizer
from pkt_pipeline.xtok import align_example, align_spans, content_cuts, content_spans


def spans_of(text: str, pieces: list[str]) -> np.ndarray:
    """[T, 2] spans of `pieces`, which must concatenate to `text` (a piece "" is a zero-width token)."""
    assert "".join(pieces) == text
    out, cursor = [], 0
    for piece in pieces:
        out.append((cursor, cursor + len(piece)))
        cursor += len(piece)
    return np.array(out)


def test_pairs_end_at_the_same_character_and_chunks_cover_the_same_text():
    text = "hello big world"
    teacher = spans_of(text, ["hello", " big", " world"])
    student = spans_of(text, ["he", "llo", " b", "ig", " wor", "ld"])
    alignment = align_spans(teacher, [(0, len(text))], student, [(0, len(text))])
    assert alignment.pairs.tolist() == [[0, 1], [1, 3], [2, 5]]
    assert alignment.chunks.tolist() == [[0, 1, 0, 2], [1, 2, 2, 4], [2, 3, 4, 6]]
    assert alignment.pair_messages.tolist() == [0, 0, 0] and alignment.chunk_messages.tolist() == [0, 0, 0]


def test_spaces_attached_to_either_side_share_no_boundary_inside_the_word_gap():
    """"a b" as ["a ", "b"] and ["a", " b"]: the only shared cuts are the ends; the space is in one chunk on both."""
    text = "a b"
    alignment = align_spans(spans_of(text, ["a ", "b"]), [(0, 3)], spans_of(text, ["a", " b"]), [(0, 3)])
    assert alignment.pairs.tolist() == [[1, 1]]
    assert alignment.chunks.tolist() == [[0, 2, 0, 2]]


def test_a_tokenizer_that_drops_spaces_cuts_through_the_gap():
    """SentencePiece-like offsets leave a dropped space uncovered: both sides of it are cuts."""
    teacher = np.array([(0, 5), (5, 11)])           # "hello", " world"
    student = np.array([(0, 5), (6, 11)])           # "hello", "world" (the space belongs to no token)
    alignment = align_spans(teacher, [(0, 11)], student, [(0, 11)])
    assert alignment.pairs.tolist() == [[0, 0], [1, 1]]
    assert alignment.chunks.tolist() == [[0, 1, 0, 1], [1, 2, 1, 2]]


def test_a_multibyte_character_split_over_tokens_is_no_boundary():
    """Byte-level BPE gives both halves of "é" the character's span: no cut between them."""
    text = "café au"
    teacher = np.array([(0, 3), (3, 4), (3, 4), (4, 7)])   # "caf", é's first byte, é's second byte, " au"
    student = np.array([(0, 4), (4, 7)])                   # "café", " au"
    cuts = content_cuts(teacher, [(0, len(text))])
    assert (0, 3) in cuts and cuts[(0, 3)] == 0 and (0, 4) in cuts and cuts[(0, 4)] == 2
    alignment = align_spans(teacher, [(0, len(text))], student, [(0, len(text))])
    assert alignment.pairs.tolist() == [[2, 0], [3, 1]]
    assert alignment.chunks.tolist() == [[0, 3, 0, 1], [3, 4, 1, 2]]
    # a token that ends inside the character (its first byte with "caf") makes no cut at 3 either
    merged = np.array([(0, 4), (3, 4), (4, 7)])
    assert (0, 3) not in content_cuts(merged, [(0, len(text))])


def test_no_shared_boundary_for_a_while_makes_one_long_chunk():
    text = "abcdefgh"
    teacher = spans_of(text, ["ab", "cd", "ef", "gh"])
    student = spans_of(text, ["a", "bcd", "e", "fg", "h"])
    alignment = align_spans(teacher, [(0, 8)], student, [(0, 8)])
    assert alignment.pairs.tolist() == [[1, 1], [3, 4]]          # after "abcd" and at the end only
    assert alignment.chunks.tolist() == [[0, 2, 0, 2], [2, 4, 2, 5]]


def test_template_text_is_never_aligned_and_chunks_stay_inside_one_message():
    """Two chat renders with different templates: only the contents are shared; the template tokens (even the
    same newline) are in no pair and no chunk."""
    teacher_text = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nYes<|im_end|>\n"
    student_text = "<|user|>\nHi there<|end|>\n<|assistant|>\nYes<|end|>\n"
    teacher = spans_of(teacher_text, ["<|im_start|>", "user", "\n", "Hi", " there", "<|im_end|>", "\n",
                                      "<|im_start|>", "assistant", "\n", "Yes", "<|im_end|>", "\n"])
    student = spans_of(student_text, ["<|user|>", "\n", "H", "i", " there", "<|end|>", "\n", "<|assistant|>", "\n",
                                      "Yes", "<|end|>", "\n"])
    t_contents = [(teacher_text.index("Hi"), teacher_text.index("Hi") + 8), (teacher_text.index("Yes"),) * 2]
    t_contents[1] = (t_contents[1][0], t_contents[1][0] + 3)
    s_contents = [(student_text.index("Hi"), student_text.index("Hi") + 8), (student_text.index("Yes"),) * 2]
    s_contents[1] = (s_contents[1][0], s_contents[1][0] + 3)
    alignment = align_spans(teacher, t_contents, student, s_contents)
    assert alignment.pairs.tolist() == [[3, 3], [4, 4], [10, 9]]
    assert alignment.pair_messages.tolist() == [0, 0, 1]
    assert alignment.chunks.tolist() == [[3, 4, 2, 4], [4, 5, 4, 5], [10, 11, 9, 10]]
    assert alignment.chunk_messages.tolist() == [0, 0, 1]


def test_a_truncated_sequence_has_no_cut_after_its_last_token():
    text = "abcd"
    teacher = spans_of(text, ["ab", "cd"])
    truncated = spans_of("ab", ["ab"])
    assert align_spans(teacher, [(0, 4)], truncated, [(0, 4)], student_complete=False).pairs.tolist() == []
    assert align_spans(teacher, [(0, 4)], truncated, [(0, 4)]).pairs.tolist() == [[0, 0]]


def test_different_contents_are_refused():
    with pytest.raises(ValueError, match="message 0's content is 4 characters in the teacher's render and 3"):
        align_spans(np.zeros((0, 2)), [(0, 4)], np.zeros((0, 2)), [(0, 3)])


def test_real_tokenizers_with_other_vocabularies_and_templates():
    """The tiny teacher's ChatML tokenizer and the cross student's (other vocabulary, other template, other special
    tokens) on a conversation with multi-byte characters and a content that also occurs in template text."""
    teacher = build_tokenizer()
    student = build_tokenizer(320, OTHER_SPECIAL_TOKENS, OTHER_TEMPLATE)
    messages = [{"role": "user", "content": "How many clips, café 日本?"},
                {"role": "assistant", "content": "user 48 + 24 = 72."}]
    cached = format_example({"messages": messages}, teacher)
    contents = content_spans(messages, teacher, "chat", cached.text)
    assert [cached.text[a:b] for a, b in contents] == [m["content"] for m in messages]
    aligned = align_example("x", messages, cached.text, cached.offsets, teacher, student)
    own = format_example({"messages": messages}, student)
    assert aligned.input_ids.tolist() == own.input_ids.tolist() and aligned.answer.tolist() == own.answer.tolist()
    pairs, chunks = aligned.alignment.pairs, aligned.alignment.chunks
    assert len(pairs) >= 10
    specials = set(teacher.all_special_ids), set(student.all_special_ids)
    for t, s in pairs:  # both have read the same text, and neither ends on template text
        assert int(cached.input_ids[t]) not in specials[0] and int(own.input_ids[s]) not in specials[1]
    for t0, t1, s0, s1 in chunks:  # each chunk decodes to the same string on both sides
        assert teacher.decode(cached.input_ids[t0:t1]) == student.decode(own.input_ids[s0:s1])
    # both templates put a newline before and a special token after each content: every content character is
    # in exactly one chunk, template text in none
    covered = "".join(teacher.decode(cached.input_ids[t0:t1]) for t0, t1, _, _ in chunks)
    assert covered == "".join(m["content"] for m in messages)


def test_a_template_that_drops_a_content_is_refused():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] "
                               "+ '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yes"}]
    with pytest.raises(ValueError, match=r"does not write each message's content once, in order \(it wrote message "
                                         r"contents \['1', '2'\]\)"):
        content_spans(messages, tokenizer, "chat", "")
