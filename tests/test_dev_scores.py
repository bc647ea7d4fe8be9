"""Dev-set scoring (`pkt eval --dev`): transfer-split rows read back as the MMLU items and reference
replies they are, each score equal to the test-set scorer's on the same text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import require_dataset, require_file
from pkt_pipeline.evaluation.dev import DevRow, as_mmlu_item, load_dev_rows, score_dev
from pkt_pipeline.evaluation.mmlu import MmluItem, mmlu_prompt, score_mmlu


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _chat(user: str, reply: str, **extra) -> dict:
    return {**extra, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


ITEM = MmluItem("philosophy_12", "philosophy", "According to James, indeterminism allows that the world has _____.",
                ("no ambiguous possibilities", "a fixed future", "ambiguous possibilities", "no shadow of turning"), 2)


def test_an_mmlu_row_reads_back_as_the_item_it_was_written_from():
    row = DevRow("philosophy_12", mmlu_prompt(ITEM), "The answer is: C")
    assert as_mmlu_item(row) == (ITEM, "The answer is:")
    assert as_mmlu_item(DevRow("x", "What is 2 + 2?", "4")) is None


def test_every_real_mmlu_align_row_is_an_item_whose_prompt_is_rebuilt_exactly():
    transfer = require_dataset("transfer-splits")
    require_file(transfer / "mmlu" / "align.jsonl")
    rows = load_dev_rows(["mmlu/align"], str(transfer.parent))
    parsed = [as_mmlu_item(row) for row in rows]
    assert len(rows) == 80 and all(p is not None for p in parsed)
    assert all(mmlu_prompt(item) == row.prompt for row, (item, _) in zip(rows, parsed))
    assert {prefix for _, prefix in parsed} == {"The answer is:"}


def test_slices_ids_and_bad_rows(tmp_path):
    data = _rows(tmp_path / "d.jsonl", [_chat(f"q{i}", f"a{i}", id=f"r{i}") for i in range(6)])
    assert [r.id for r in load_dev_rows([f"{data}[4:]", f"{data}[:2]"])] == ["r4", "r5", "r0", "r1"]
    anonymous = _rows(tmp_path / "n.jsonl", [_chat("q", "a"), _chat("q2", "a2")])
    assert [r.id for r in load_dev_rows([str(anonymous)])] == [f"{anonymous}:1", f"{anonymous}:2"]
    with pytest.raises(ValueError, match="dev rows repeat ids"):
        load_dev_rows([str(data), f"{data}[1:2]"])
    bad = _rows(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(ValueError, match=r"b.jsonl:1: a dev row needs `messages` ending in a user turn"):
        load_dev_rows([str(bad)])


def test_dev_scores_equal_the_test_set_scorers(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    data = _rows(tmp_path / "dev.jsonl", [_chat(mmlu_prompt(ITEM), "The answer is: C", id="m"),
                                          _chat("Natalia sold 48 clips. Half as many in May?", "48 / 2 = 24. #### 24",
                                                id="g")])
    records = score_dev(model, tokenizer, load_dev_rows([str(data)]), batch_size=2, progress=False)

    expected = score_mmlu(model, tokenizer, [ITEM], progress=False, answer_prefix="The answer is:")[0]
    assert records[0]["p_correct"] == pytest.approx(expected["p_correct"], rel=1e-5)
    assert records[0]["correct"] == expected["correct"] and "p_correct" not in records[1]
    # The reply's NLL by a plain forward over the chat-rendered prompt and the reply.
    for record, (prompt, reply) in zip(records, [(mmlu_prompt(ITEM), "The answer is: C"),
                                                 ("Natalia sold 48 clips. Half as many in May?", "48 / 2 = 24. #### 24")]):
        context = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        context_ids, reply_ids = tokenizer.encode(context), tokenizer.encode(reply)
        ids = torch.tensor([context_ids + reply_ids])
        labels = ids.clone()
        labels[0, :len(context_ids)] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        assert record["nll"] == pytest.approx(float(loss), rel=1e-4)


def test_pkt_eval_dev_scores_rows_of_a_slice_and_writes_their_records(tiny_pair, tmp_path):
    import subprocess
    import sys

    rows = [_chat(mmlu_prompt(ITEM), "The answer is: C", id="m0"), _chat("Add 2 and 3.", "2 + 3 = 5. #### 5", id="g1"),
            _chat(mmlu_prompt(ITEM), "The answer is: C", id="m2")]
    data = _rows(tmp_path / "dev.jsonl", rows)
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", "eval", str(tiny_pair["teacher"]),
                             "--dev", f"{data}[:2]", "--out", str(out), "--no-progress",
                             "--set", "runtime.dtype=float32"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"dev"} and "mmlu" not in metrics
    assert metrics["dev"]["nll_n"] == 2 and metrics["dev"]["p_correct_n"] == 1 and metrics["dev"]["n"] == 1
    records = [json.loads(line) for line in (out / "items" / "dev.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["m0", "g1"]
