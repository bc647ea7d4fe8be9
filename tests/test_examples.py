"""Examples: token ids, the answer mask in both prompt formats, truncation, ids, hashes and bad input."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from conftest import require_dataset, require_file
from pkt_pipeline.examples import (
    PROMPT_FORMATS,
    Example,
    dataset_fingerprint,
    format_example,
    load_examples,
    read_jsonl_rows,
)
from pkt_pipeline.models import load_tokenizer


# Two assistant turns, a system turn, answers starting with a digit and with a letter (BPE fuses
# a preceding space with a letter), a newline and non-ASCII text inside an answer.
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6.\nDone: naïve ≈ 6 €"},
]
EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    return load_tokenizer(tiny_pair["teacher"])


def _row(messages=CONVERSATION, **extra) -> dict:
    return {"messages": messages, **extra}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _decode(tokenizer, ids: np.ndarray) -> str:
    return tokenizer.decode(ids.tolist())


def test_example_arrays_have_the_documented_types(tokenizer):
    example = format_example(_row(id="q1"), tokenizer)
    assert isinstance(example, Example)
    assert example.input_ids.dtype == np.int32 and example.input_ids.ndim == 1
    assert example.supervised.dtype == np.bool_ and example.supervised.shape == example.input_ids.shape
    assert not example.truncated


def test_chat_supervises_each_answer_and_its_end_of_turn_token(tokenizer):
    example = format_example(_row(id="q1"), tokenizer, "chat")
    assert example.input_ids.tolist() == list(tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"])
    assert _decode(tokenizer, example.input_ids[example.supervised]) == f"4{EOT}It is 6.\nDone: naïve ≈ 6 €{EOT}"
    assert _decode(tokenizer, example.input_ids[~example.supervised]) == (
        f"<|im_start|>system\nBe brief.{EOT}\n<|im_start|>user\nWhat is 2+2?{EOT}\n<|im_start|>assistant\n"
        f"\n<|im_start|>user\nAnd 3+3?{EOT}\n<|im_start|>assistant\n"
        "\n"
    )


def test_chat_mask_is_two_contiguous_runs_each_ending_on_the_end_of_turn_token(tokenizer):
    example = format_example(_row(), tokenizer, "chat")
    edges = np.flatnonzero(np.diff(example.supervised.astype(np.int8)))
    assert len(edges) == 4
    eot = tokenizer.convert_tokens_to_ids(EOT)
    for run_end in edges[1::2]:
        assert example.input_ids[run_end] == eot
        assert not example.supervised[run_end + 1]


def test_plain_format_is_the_papers_prompt_with_the_answer_space_supervised(tokenizer):
    example = format_example(_row(), tokenizer, "plain")
    assert _decode(tokenizer, example.input_ids) == (
        f"Be brief.\nUser: What is 2+2?\nAssistant: 4{EOT}\n"
        f"User: And 3+3?\nAssistant: It is 6.\nDone: naïve ≈ 6 €{EOT}"
    )
    assert _decode(tokenizer, example.input_ids[example.supervised]) == f" 4{EOT} It is 6.\nDone: naïve ≈ 6 €{EOT}"
    assert _decode(tokenizer, example.input_ids[~example.supervised]) == (
        "Be brief.\nUser: What is 2+2?\nAssistant:\nUser: And 3+3?\nAssistant:"
    )


def test_plain_single_turn_is_exactly_user_assistant_eos(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    example = format_example(_row(messages), tokenizer, "plain")
    assert _decode(tokenizer, example.input_ids) == f"User: Hi\nAssistant: Hello{EOT}"
    assert _decode(tokenizer, example.input_ids[example.supervised]) == f" Hello{EOT}"


def test_an_empty_answer_still_supervises_the_end_of_turn_token(tokenizer):
    messages = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]
    example = format_example(_row(messages), tokenizer, "chat")
    assert _decode(tokenizer, example.input_ids[example.supervised]) == EOT


@pytest.mark.parametrize("prompt_format", PROMPT_FORMATS)
def test_train_on_inputs_supervises_every_token(tokenizer, prompt_format):
    example = format_example(_row(), tokenizer, prompt_format, train_on_inputs=True)
    assert example.supervised.all()
    plain = format_example(_row(), tokenizer, prompt_format)
    assert np.array_equal(example.input_ids, plain.input_ids)
    # The reply tokens stay known, for losses that look at the answer alone.
    assert np.array_equal(example.answer, plain.supervised) and np.array_equal(plain.answer, plain.supervised)


def test_truncation_keeps_the_first_max_length_tokens(tokenizer):
    full = format_example(_row(), tokenizer, "chat")
    cut = format_example(_row(), tokenizer, "chat", max_length=len(full.input_ids) - 5)
    assert cut.truncated and not full.truncated
    assert len(cut.input_ids) == len(cut.supervised) == len(full.input_ids) - 5
    assert np.array_equal(cut.input_ids, full.input_ids[: len(cut.input_ids)])
    assert np.array_equal(cut.supervised, full.supervised[: len(cut.input_ids)])
    exact = format_example(_row(), tokenizer, "chat", max_length=len(full.input_ids))
    assert not exact.truncated and len(exact.input_ids) == len(full.input_ids)


def test_truncation_may_leave_no_supervised_token(tokenizer):
    example = format_example(_row(), tokenizer, "chat", max_length=3)
    assert example.truncated and len(example.input_ids) == 3 and not example.supervised.any()


def test_load_examples_counts_and_warns_about_truncation(tokenizer, tmp_path, caplog):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "4"}]
    path = _write_jsonl(tmp_path / "train.jsonl", [_row(short), _row(), _row(short)])
    limit = len(format_example(_row(short), tokenizer).input_ids)
    with caplog.at_level(logging.WARNING, logger="pkt_pipeline.examples"):
        examples, stats = load_examples(path, tokenizer, max_length=limit)
    assert [e.truncated for e in examples] == [False, True, False]
    assert stats == {
        "examples": 3,
        "tokens": 3 * limit,
        "supervised_tokens": int(sum(e.supervised.sum() for e in examples)),
        "truncated": 1,
    }
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 of 3 examples" in warnings[0].getMessage()


def test_load_examples_without_truncation_logs_no_warning(tokenizer, tmp_path, caplog):
    path = _write_jsonl(tmp_path / "train.jsonl", [_row()])
    with caplog.at_level(logging.WARNING, logger="pkt_pipeline.examples"):
        _, stats = load_examples(path, tokenizer)
    assert stats["truncated"] == 0 and not caplog.records


def test_example_ids_come_from_the_id_field_or_the_file_and_row(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "align.jsonl", [_row(id="gsm_7"), _row(), _row(id=12)])
    examples, _ = load_examples(path, tokenizer)
    assert [e.example_id for e in examples] == ["gsm_7", "align-000001", "12"]
    assert format_example(_row(id="own"), tokenizer, example_id="fallback").example_id == "own"
    assert format_example(_row(), tokenizer, example_id="fallback").example_id == "fallback"


def test_load_examples_limit_keeps_the_first_rows(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [_row(id=f"r{i}") for i in range(5)])
    examples, stats = load_examples(path, tokenizer, limit=2)
    assert [e.example_id for e in examples] == ["r0", "r1"] and stats["examples"] == 2


def test_content_hash_depends_on_the_messages_only(tokenizer):
    base = format_example(_row(id="a", dataset="gsm"), tokenizer)
    assert base.content_hash == format_example(_row(id="b"), tokenizer, "plain").content_hash
    reordered_keys = [{"content": m["content"], "role": m["role"]} for m in CONVERSATION]
    assert base.content_hash == format_example(_row(reordered_keys), tokenizer).content_hash
    changed = CONVERSATION[:-1] + [{"role": "assistant", "content": "It is 7."}]
    assert base.content_hash != format_example(_row(changed), tokenizer).content_hash
    canonical = json.dumps(CONVERSATION, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert base.content_hash == hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_dataset_fingerprint_tracks_settings_order_and_content(tokenizer):
    other = CONVERSATION[:-1] + [{"role": "assistant", "content": "It is 7."}]
    a, b = format_example(_row(id="a"), tokenizer), format_example(_row(other, id="b"), tokenizer)
    settings = {"format": "chat", "max_length": 1024, "train_on_inputs": False}
    reference = dataset_fingerprint([a, b], settings)
    assert reference == dataset_fingerprint([a, b], dict(reversed(list(settings.items()))))
    assert reference != dataset_fingerprint([b, a], settings)
    assert reference != dataset_fingerprint([a, b], {**settings, "max_length": 512})
    assert reference != dataset_fingerprint([a], settings)
    b_changed = format_example(_row(CONVERSATION, id="b"), tokenizer)
    assert reference != dataset_fingerprint([a, b_changed], settings)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl_rows(missing)


def test_bad_json_line_is_named_with_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_row()) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_jsonl_rows(path)


def test_a_line_without_a_messages_list_is_named(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(_row()) + "\n\n" + json.dumps({"messages": "hi"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r'odd\.jsonl:3: expected a JSON object with a "messages" list'):
        read_jsonl_rows(path)


def test_empty_file_has_no_examples(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl has no examples"):
        load_examples(path, tokenizer)


def test_unknown_prompt_format_lists_the_known_ones(tokenizer):
    with pytest.raises(ValueError, match=r"unknown prompt_format 'alpaca'; expected one of chat, plain"):
        format_example(_row(), tokenizer, "alpaca")


@pytest.mark.parametrize("prompt_format", PROMPT_FORMATS)
def test_last_turn_must_be_the_assistants(tokenizer, prompt_format):
    with pytest.raises(ValueError, match=r"example 'q9' ends with a 'user' turn"):
        format_example(_row(CONVERSATION[:-1], id="q9"), tokenizer, prompt_format)


def test_first_gsm_rows_load_with_answers_and_ids(tokenizer):
    gsm_train = require_file(require_dataset("transfer-splits") / "gsm" / "train.jsonl")
    rows = read_jsonl_rows(gsm_train)[:20]
    examples, stats = load_examples(gsm_train, tokenizer, limit=20)
    assert stats["examples"] == 20 and stats["truncated"] == 0
    assert [e.example_id for e in examples] == [row["id"] for row in rows]
    for example, row in zip(examples, rows):
        assert example.supervised.any()
        answer = row["messages"][-1]["content"]
        assert _decode(tokenizer, example.input_ids[example.supervised]) == answer + EOT
