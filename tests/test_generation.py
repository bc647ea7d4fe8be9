"""pkt's greedy decoding loop against `model.generate(do_sample=False)` run one prompt at a time
(no padding, no batch), on the tiny float32 teacher: same token ids whatever the batching, rows
ending at EOS, at a stop rule or at max_new_tokens, the batch shrinking and refilling meanwhile."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pkt_pipeline.evaluation.code_tasks import extract_code
from pkt_pipeline.evaluation.generation import (
    _GrowingLayer, _PackedLinear, _Rows, code_stop, eos_token_ids, generate, greedy_generate, gsm8k_stop, packed_linears, stop_at,
)
from pkt_pipeline.evaluation.gsm8k import extract_final_number
from pkt_pipeline.models import load_model, load_tokenizer

PROMPTS = [
    "def add(a, b):",
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "for i in range(10):\n    print(i * i)\nThe answer is",
    "x",
    "Write a function to find the maximum of three numbers.",
    "How many clips did Natalia sell altogether?",
    "def is_even(n: int) -> bool:\n    \"\"\"Return True if n is even.\"\"\"",
]
MAX_NEW = 40


@pytest.fixture(scope="module")
def tiny(tiny_pair):
    """The tiny teacher in float32 (bf16 batched vs unbatched may legitimately differ) and its tokenizer."""
    model = load_model(tiny_pair["teacher"], dtype="float32", device="cpu")
    return model, load_tokenizer(tiny_pair["teacher"])


@pytest.fixture
def config(tiny):
    """Restore the generation config a test changes (EOS ids, repetition penalty)."""
    model, _ = tiny
    saved = model.generation_config.to_dict()
    yield model.generation_config
    for key, value in saved.items():
        setattr(model.generation_config, key, value)


_REFERENCE: dict[tuple, list[int]] = {}


def reference(model, tokenizer, prompts, max_new_tokens=MAX_NEW) -> list[list[int]]:
    """`model.generate` greedy, one prompt at a time: the new token ids, a final EOS included.
    Memoised per prompt and generation config, since several tests need the same rows."""
    out = []
    for prompt in prompts:
        key = (prompt, max_new_tokens, repr(sorted(model.generation_config.to_diff_dict().items())))
        if key not in _REFERENCE:
            encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            _REFERENCE[key] = generated[0, encoded["input_ids"].shape[1]:].tolist()
        out.append(_REFERENCE[key])
    return out


def early_eos(rows: list[list[int]]) -> int:
    """A token the untrained model emits in the most rows (after their first token): made an extra
    EOS, it ends those rows at different steps."""
    return Counter(t for row in rows for t in set(row[1:])).most_common(1)[0][0]


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_batched_loop_matches_unbatched_generate_with_early_eos(tiny, config):
    model, tokenizer = tiny
    # An extra EOS the model does emit (the config holds a list, as Qwen's does): rows end at
    # different steps, so the batch shrinks and refills.
    common = early_eos(reference(model, tokenizer, PROMPTS))
    config.eos_token_id = [tokenizer.eos_token_id, common]
    assert eos_token_ids(model, tokenizer) == {tokenizer.eos_token_id, common}
    expected = reference(model, tokenizer, PROMPTS)
    assert any(row[-1] == common and len(row) < MAX_NEW for row in expected)  # some end early on EOS
    assert any(len(row) == MAX_NEW for row in expected)  # some run to max_new_tokens
    for batch_size, refill in ((3, True), (3, False), (16, True)):  # refilled, only shrinking, all in one batch
        got = greedy_generate(model, tokenizer, PROMPTS, MAX_NEW, batch_size, refill=refill, progress=False)
        assert [g.token_ids for g in got] == expected, (batch_size, refill)
        assert [g.finish for g in got] == ["eos" if row[-1] == common else "length" for row in expected]
        assert [g.text for g in got] == tokenizer.batch_decode(expected, skip_special_tokens=True)


def test_refill_joins_rows_of_other_lengths_both_ways(tiny, config, monkeypatch):
    """Newcomers shorter and longer than the running batch's cache: both sides get left-padded."""
    model, tokenizer = tiny
    config.eos_token_id = [tokenizer.eos_token_id, early_eos(reference(model, tokenizer, PROMPTS))]
    prompts = PROMPTS + [p + " " + p for p in PROMPTS[1::2]]
    widths = []
    original = _Rows.join

    def join(self, other):
        widths.append((self.mask.shape[1], other.mask.shape[1]))
        original(self, other)

    monkeypatch.setattr(_Rows, "join", join)
    got = greedy_generate(model, tokenizer, prompts, MAX_NEW, 3, progress=False)
    assert [g.token_ids for g in got] == reference(model, tokenizer, prompts)
    assert any(a > b for a, b in widths) and any(a < b for a, b in widths), widths


def test_prefill_in_parts_joins_them_into_one_batch(tiny, config, monkeypatch):
    """A batch filled by several prefill forwards (PREFILL_ROWS prompts each) decodes the same tokens."""
    import pkt_pipeline.evaluation.generation as generation

    model, tokenizer = tiny
    config.eos_token_id = [tokenizer.eos_token_id, early_eos(reference(model, tokenizer, PROMPTS))]
    monkeypatch.setattr(generation, "PREFILL_ROWS", 2)
    calls, handle = count_forwards(model)
    try:
        got = greedy_generate(model, tokenizer, PROMPTS, MAX_NEW, len(PROMPTS), refill=False, progress=False)
    finally:
        handle.remove()
    assert [g.token_ids for g in got] == reference(model, tokenizer, PROMPTS)
    longest = max(len(g.token_ids) for g in got)
    assert len(calls) == 4 + longest - 1  # 7 prompts in 4 prefills, then one forward per further token


def test_repetition_penalty_is_applied_as_generate_does(tiny, config):
    model, tokenizer = tiny
    before = reference(model, tokenizer, PROMPTS)
    config.repetition_penalty = 1.3
    expected = reference(model, tokenizer, PROMPTS)
    assert expected != before
    got = greedy_generate(model, tokenizer, PROMPTS, MAX_NEW, 4, progress=False)
    assert [g.token_ids for g in got] == expected


def test_stop_string_cuts_after_it_and_ends_the_row_early(tiny):
    model, tokenizer = tiny
    prompt = PROMPTS[0]
    full_ids = reference(model, tokenizer, [prompt])[0]
    full = tokenizer.decode(full_ids, skip_special_tokens=True)
    marker = full[8:11]  # a stop string the model does produce, a few tokens in
    end = full.find(marker) + len(marker)
    calls, handle = count_forwards(model)
    try:
        [got] = greedy_generate(model, tokenizer, [prompt], MAX_NEW, 1, stop=marker, progress=False)
    finally:
        handle.remove()
    assert got.finish == "stop" and got.text == full[:end] and got.text.endswith(marker)
    # Just enough tokens to spell the stop string: one prefill and a step per further token.
    assert got.token_ids == full_ids[:len(got.token_ids)]
    assert tokenizer.decode(got.token_ids[:-1], skip_special_tokens=True).find(marker) < 0
    assert len(calls) == len(got.token_ids) < MAX_NEW
    # Several strings: the one that ends first wins; a callable rule gets the same cut.
    assert generate(model, tokenizer, [prompt], MAX_NEW, stop=["\x00never", marker], progress=False) == [full[:end]]
    assert generate(model, tokenizer, [prompt], MAX_NEW, stop=stop_at(marker), progress=False) == [full[:end]]


def test_shrinking_the_batch_leaves_other_rows_unchanged(tiny):
    model, tokenizer = tiny
    expected = reference(model, tokenizer, PROMPTS)
    texts = tokenizer.batch_decode(expected, skip_special_tokens=True)
    marker = texts[1][5:9]  # ends row 1 early; other rows only if they happen to produce it too
    calls, handle = count_forwards(model)
    try:
        got = greedy_generate(model, tokenizer, PROMPTS, MAX_NEW, len(PROMPTS), stop=marker, refill=False,
                              progress=False)
    finally:
        handle.remove()
    assert got[1].finish == "stop" and len(got[1].token_ids) < MAX_NEW
    for row, (g, ids, text) in enumerate(zip(got, expected, texts)):
        if marker in text:
            assert g.finish == "stop" and g.token_ids == ids[:len(g.token_ids)]
            assert g.text == text[:text.find(marker) + len(marker)]
        else:
            assert g.token_ids == ids and g.finish != "stop", row
    assert len(calls) == MAX_NEW  # one batch: a prefill and MAX_NEW - 1 steps for the longest rows


def test_generate_keeps_input_order_and_the_old_signature(tiny):
    model, tokenizer = tiny
    texts = generate(model, tokenizer, PROMPTS, 12, 2, False, "gen")
    assert texts == tokenizer.batch_decode(reference(model, tokenizer, PROMPTS, 12), skip_special_tokens=True)


def test_bad_input(tiny, config):
    model, tokenizer = tiny
    assert generate(model, tokenizer, [], 10, progress=False) == []
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1, got 0"):
        generate(model, tokenizer, PROMPTS, 0, progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0"):
        generate(model, tokenizer, PROMPTS, 5, 0, progress=False)
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate(model, tokenizer, ["x", ""], 5, progress=False)
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        generate(model, tokenizer, ["x"], 5, stop=[""], progress=False)
    config.min_length, config.num_beams, config.suppress_tokens = 0, 1, []  # neutral values, as old configs spell them
    assert generate(model, tokenizer, ["x"], 2, progress=False)
    config.no_repeat_ngram_size = 3
    with pytest.raises(ValueError, match=r"generation_config sets no_repeat_ngram_size=3"):
        generate(model, tokenizer, ["x"], 5, progress=False)


# ---------------------------------------------------------------- task stop rules

CODE_ANSWERS = [
    "Here it is:\n```python\ndef f(x):\n    return x + 1\n```\n\nExplanation: ```python\nother()\n```",
    "```\nprint(1)\n```trailing",
    "````python\ndef g():\n    pass\n```",
    "```py\nx = 1  # ``` inside\n```",
]


def test_code_stop_cuts_after_the_first_block_and_extracts_the_same_code():
    for answer in CODE_ANSWERS:
        cuts = {i: code_stop(answer[:i]) for i in range(len(answer) + 1)}
        fired = [i for i, cut in cuts.items() if cut is not None]
        assert fired, answer
        first = fired[0]
        assert answer[:cuts[first]].endswith("```")
        # Monotone: once it fires, every longer text gets the same cut, so stopping early equals cutting.
        assert all(cuts[i] == cuts[first] for i in fired) and fired == list(range(first, len(answer) + 1))
        assert extract_code(answer[:cuts[first]]) == extract_code(answer)
    assert code_stop("def f():\n    return 1") is None
    assert code_stop("```python\ndef f():\n    return 1\n") is None  # unclosed: keep going


GSM_ANSWERS = [
    ("Step 1: 3 + 4 = 7.\nSo the answer is 7.\n\nQuestion: Tom has 9 apples. The answer is 9.", "7"),
    ("48 / 2 = 24 clips in May.\nSo the answer is **72**.\n \nQuestion: next", "72"),
    ("The final answer is $\\boxed{18}$.\n\nI hope it helps. The answer is 3", "18"),
    ("#### -5\n\nmore", "-5"),
]


def test_gsm8k_stop_ends_the_answer_paragraph_and_keeps_the_verdict_input():
    for answer, number in GSM_ANSWERS:
        cut = gsm8k_stop(answer)
        assert cut is not None and answer[:cut].replace(" ", "").endswith("\n\n")
        assert extract_final_number(answer[:cut]) == number
        assert all(gsm8k_stop(answer[:i]) in (None, cut) for i in range(len(answer) + 1))
    # Reasoning that mentions "answer" without stating one, or an answer line not yet ended, goes on.
    assert gsm8k_stop("To find the answer: we need 5 apples and 3 pears.\n\nStep 2: 8 in all.") is None
    assert gsm8k_stop("#### 1. Add the apples\n\n3 + 4 = 7.\n\n#### 2. So the answer is 7.") is None
    assert gsm8k_stop("So the answer is 72.") is None
    assert gsm8k_stop("So the answer is 72.\n") is None


def test_each_generative_task_names_its_stop_rule():
    from pkt_pipeline.evaluation.tasks import get_task

    assert get_task("gsm8k").stop_rule() is gsm8k_stop
    assert get_task("humaneval").stop_rule() is get_task("mbpp").stop_rule() is code_stop


def test_stop_rule_over_a_real_row(tiny):
    """A task rule on real decoding: the row ends at the first token where the rule fires."""
    model, tokenizer = tiny
    prompt = PROMPTS[2]
    full = tokenizer.decode(reference(model, tokenizer, [prompt])[0], skip_special_tokens=True)
    seen = []

    def rule(text: str) -> int | None:
        seen.append(text)
        return len(text) - 1 if len(text) >= 10 else None

    [got] = greedy_generate(model, tokenizer, [prompt], MAX_NEW, stop=rule, progress=False)
    assert got.finish == "stop" and got.text == seen[-1][:-1] and full.startswith(seen[-1])
    assert all(len(text) < 10 for text in seen[:-1])
    assert len(got.token_ids) == len(seen)


def test_bf16_model_runs_through_the_loop(tiny_pair):
    """bf16, the real models' dtype on CPU: same loop, no float32-only assumption."""
    model = load_model(tiny_pair["student"], dtype="bfloat16", device="cpu")
    tokenizer = load_tokenizer(tiny_pair["student"])
    got = greedy_generate(model, tokenizer, PROMPTS, 8, 3, progress=False)
    assert all(0 < len(g.token_ids) <= 8 for g in got)
    assert all(isinstance(t, int) for g in got for t in g.token_ids)


def test_packed_weights_give_the_same_tokens_and_the_model_gets_its_linears_back(tiny, config):
    """The packed path (on by default, so the tests above run it against `model.generate`) equals the
    plain one row for row, really runs packed, and leaves the model's own modules in place."""
    model, tokenizer = tiny
    config.eos_token_id = [tokenizer.eos_token_id, early_eos(reference(model, tokenizer, PROMPTS))]
    linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert "lm_head" in linears
    seen_head = []
    handle = model.register_forward_pre_hook(lambda m, *_: seen_head.append(type(m.lm_head)))
    try:
        packed = greedy_generate(model, tokenizer, PROMPTS, MAX_NEW, 3, progress=False)
        assert set(seen_head) == {_PackedLinear}
        seen_head.clear()
        plain = greedy_generate(model, tokenizer, PROMPTS, MAX_NEW, 3, progress=False, pack_weights=False)
        assert set(seen_head) == {torch.nn.Linear}
    finally:
        handle.remove()
    assert [g.token_ids for g in packed] == [g.token_ids for g in plain] == reference(model, tokenizer, PROMPTS)
    assert {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear} == linears


def test_packed_linears_restores_after_an_error_and_skips_other_dtypes(tiny, tiny_pair):
    model, _ = tiny
    linears = dict(model.named_modules())
    with pytest.raises(RuntimeError, match="boom"):
        with packed_linears(model, 4) as swapped:
            assert swapped == sum(type(m) is torch.nn.Linear for m in linears.values()) > 0
            assert isinstance(model.lm_head, _PackedLinear)
            raise RuntimeError("boom")
    assert dict(model.named_modules()) == linears
    with packed_linears(model, 4, enabled=False) as swapped:
        assert swapped == 0
    bf16 = load_model(tiny_pair["student"], dtype="bfloat16", device="cpu")
    with packed_linears(bf16, 4) as swapped:
        assert swapped == 0


def test_growing_layer_holds_what_a_dynamic_layer_holds_and_writes_steps_in_place():
    """Against transformers' DynamicLayer fed the same states: prefill, decode steps past the spare
    room, then the assignments `_Rows` makes (row selection, trimming, joining) and more steps."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    grown, plain = _GrowingLayer(), DynamicLayer()

    def feed(columns):
        rows = 3 if grown.keys is None else len(grown.keys)
        k, v = torch.randn(rows, 2, columns, 4), torch.randn(rows, 2, columns, 4)
        for layer in (grown, plain):
            out = layer.update(k, v)
        assert torch.equal(out[0], grown.keys) and torch.equal(grown.keys, plain.keys)
        assert torch.equal(grown.values, plain.values)

    feed(5)  # prefill: (rows 3, kv_heads 2, columns 5, head_dim 4)
    storage = grown.keys.untyped_storage().data_ptr()
    for _ in range(_GrowingLayer.GROW):
        feed(1)
    assert grown.keys.untyped_storage().data_ptr() == storage  # all GROW steps written in place
    feed(1)  # past the spare room: one move into a larger buffer
    assert grown.keys.shape[-2] == plain.keys.shape[-2] == 5 + _GrowingLayer.GROW + 1

    index = torch.tensor([0, 2])
    grown.batch_select_indices(index), plain.batch_select_indices(index)
    for layer in (grown, plain):  # trim two leading columns, then join a row, as _Rows does
        layer.keys, layer.values = layer.keys[..., 2:, :], layer.values[..., 2:, :]
    grown.keys = torch.randn(len(grown.keys), 2, grown.keys.shape[-2] + 3, 4)  # join assigns keys, then reads values
    assert torch.equal(grown.values, plain.values)
    grown.keys = plain.keys.clone()
    extra = torch.randn(1, 2, grown.keys.shape[-2], 4)
    for layer in (grown, plain):
        layer.keys, layer.values = torch.cat([layer.keys, extra]), torch.cat([layer.values, extra])
    assert grown.get_seq_length() == plain.get_seq_length()
    for _ in range(3):
        feed(1)
