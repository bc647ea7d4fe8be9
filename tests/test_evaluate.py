"""`pkt eval` end to end on the tiny student: every task scored, records written, contamination dropped."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pkt_pipeline.config import load_config
from conftest import require_dataset
from pkt_pipeline.datasets import find_dataset
from pkt_pipeline.evaluation.mmlu import load_mmlu, mmlu_prompt
from stages import evaluate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Three real MMLU items, the first planted in a transfer split; the other tasks' data as found."""
    for name in ("mmlu", "gsm8k", "humaneval", "mbpp"):
        require_dataset(name)
    root = tmp_path_factory.mktemp("evaldata")
    (root / "mmlu").mkdir()
    lines, subjects = [], set()
    for line in find_dataset("mmlu", allow_hub=False).read_text().splitlines():
        subject = json.loads(line).get("topic")
        if '"correct_answer": "answer"' not in line and subject not in subjects and len(lines) < 3:
            lines.append(line)
            subjects.add(subject)  # one per subject: items of one subject can share a long stem
    (root / "mmlu" / "test.jsonl").write_text("\n".join(lines) + "\n")
    planted = load_mmlu(root / "mmlu" / "test.jsonl")[0]
    (root / "transfer-splits" / "mmlu").mkdir(parents=True)
    row = {"id": "planted", "messages": [{"role": "user", "content": mmlu_prompt(planted)},
                                         {"role": "assistant", "content": "The answer is: A"}]}
    (root / "transfer-splits" / "mmlu" / "train.jsonl").write_text(json.dumps(row) + "\n")
    for name in ("gsm8k", "humaneval", "mbpp"):
        source = find_dataset(name, allow_hub=False)
        target = root / source.relative_to(source.parents[0 if source.is_dir() else 1])
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return root


@pytest.mark.usefixtures("code_sandbox")
def test_eval_scores_every_task_and_drops_contaminated_items(tiny_pair, data_dir, tmp_path):
    out = tmp_path / "eval"
    config = load_config(overrides=[f"assets.data_dir={data_dir}", f"eval.out={out}", "eval.limit=2",
                                    f"eval.model={tiny_pair['student']}", "eval.tasks=[mmlu, gsm8k, humaneval, mbpp]", "eval.max_new_tokens_gsm8k=8",
                                    "eval.max_new_tokens_code=8", "eval.timeout_s=5", "runtime.dtype=float32"])
    metrics = evaluate.run(config, progress=False)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["mmlu"]["dropped"] == 1 and metrics["mmlu"]["n"] == 2
    for task in ("mmlu", "gsm8k", "humaneval", "mbpp"):
        records = [json.loads(line) for line in (out / "items" / f"{task}.jsonl").read_text().splitlines()]
        assert len(records) == metrics[task]["n"] == 2
        assert metrics[task]["score"] == sum(r["correct"] for r in records) / 2
        assert all(r["prompt"] for r in records)
        if task == "mmlu":
            assert metrics[task]["p_correct"] == pytest.approx(sum(r["p_correct"] for r in records) / 2)
        else:
            assert all("output" in r for r in records)
            assert all(r["nll"] > 0 and r["nll_tokens"] > 0 for r in records)
            assert metrics[task]["nll"] == pytest.approx(sum(r["nll"] for r in records) / 2) and metrics[task]["nll_n"] == 2
        if task in ("humaneval", "mbpp"):
            assert all(r["verdict"] in ("passed", "failed", "timeout", "memory", "error") for r in records)
    mmlu_ids = {json.loads(line)["id"] for line in (out / "items" / "mmlu.jsonl").read_text().splitlines()}
    assert load_mmlu(data_dir / "mmlu" / "test.jsonl")[0].id not in mmlu_ids


def test_nll_items_contain_the_generated_ones_and_generation_can_be_skipped(tiny_pair, data_dir, tmp_path):
    base = [f"assets.data_dir={data_dir}", f"eval.model={tiny_pair['student']}", "eval.tasks=[gsm8k]", "eval.max_new_tokens_gsm8k=4", "runtime.dtype=float32"]
    both = evaluate.run(load_config(overrides=base + [f"eval.out={tmp_path / 'both'}", "eval.limit=2", "eval.nll_limit=5"]), progress=False)
    records = [json.loads(line) for line in (tmp_path / "both" / "items" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(records) == 5 and both["gsm8k"]["nll_n"] == 5 and both["gsm8k"]["n"] == 2
    generated = {r["id"] for r in records if r["correct"] is not None}
    assert len(generated) == 2 and all("output" in r for r in records if r["id"] in generated)
    nll_only = evaluate.run(load_config(overrides=base + [f"eval.out={tmp_path / 'nll'}", "eval.limit=5", "eval.generate=false"]), progress=False)
    assert nll_only["gsm8k"]["n"] == 0 and nll_only["gsm8k"]["nll_n"] == 5
    again = {r["id"]: r["nll"] for r in map(json.loads, (tmp_path / "nll" / "items" / "gsm8k.jsonl").open())}
    assert again == pytest.approx({r["id"]: r["nll"] for r in records})  # the same nested subset, the same values


def test_mmlu_answer_prefix_opens_the_reply_before_the_letter_is_read(tiny_pair, data_dir, tmp_path):
    records = {}
    for prefix in ("", "The answer is:"):
        out = tmp_path / ("prefixed" if prefix else "plain")
        config = load_config(overrides=[f"assets.data_dir={data_dir}", f"eval.out={out}", "eval.limit=2",
                                        f"eval.model={tiny_pair['student']}", "runtime.dtype=float32"] + [f"eval.mmlu_answer_prefix='{prefix}'"] * bool(prefix))
        evaluate.run(config, progress=False)
        records[prefix] = {r["id"]: r for r in map(json.loads, (out / "items" / "mmlu.jsonl").open())}
    plain, prefixed = records[""], records["The answer is:"]
    assert plain.keys() == prefixed.keys() and plain
    for item_id, record in prefixed.items():
        assert record["prompt"] == plain[item_id]["prompt"] + "The answer is:"
        assert record["letter_logprobs"] != plain[item_id]["letter_logprobs"]


def test_a_killed_eval_resumes_from_its_journal(tiny_pair, data_dir, tmp_path, monkeypatch):
    """Killed after the first chunk of NLL items, the rerun scores only the rest and writes the same
    records as an uninterrupted run; a journal of other settings is not reused."""
    from pkt_pipeline.evaluation import journal as journal_module
    from pkt_pipeline.evaluation import reference_nll as nll_module

    monkeypatch.setattr(journal_module, "CHUNK_ITEMS", 2)
    overrides = [f"assets.data_dir={data_dir}", f"eval.model={tiny_pair['student']}", "eval.tasks=[gsm8k]", "eval.limit=5", "eval.generate=false",
                 "runtime.dtype=float32"]
    evaluate.run(load_config(overrides=overrides + [f"eval.out={tmp_path / 'whole'}"]), progress=False)
    whole = (tmp_path / "whole" / "items" / "gsm8k.jsonl").read_text()
    assert not (tmp_path / "whole" / ".journal").exists(), "the journal is removed once records are written"

    real, scored = nll_module.reference_nll, []

    def killed_after_one_chunk(model, tokenizer, contexts, targets, *args, **kwargs):
        if scored:
            raise KeyboardInterrupt
        scored.append(len(contexts))
        return real(model, tokenizer, contexts, targets, *args, **kwargs)

    out = tmp_path / "killed"
    monkeypatch.setattr(nll_module, "reference_nll", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(load_config(overrides=overrides + [f"eval.out={out}"]), progress=False)
    assert not (out / "items" / "gsm8k.jsonl").exists() and (out / ".journal" / "gsm8k.jsonl").is_file()

    counted = []

    def counting(model, tokenizer, contexts, targets, *args, **kwargs):
        counted.append(len(contexts))
        return real(model, tokenizer, contexts, targets, *args, **kwargs)

    monkeypatch.setattr(nll_module, "reference_nll", counting)
    messages = []
    evaluate.run(load_config(overrides=overrides + [f"eval.out={out}"]), progress=False,
                 echo=messages.append)
    assert sum(counted) == 3 and any("resuming, 2 item record(s)" in m for m in messages)
    assert (out / "items" / "gsm8k.jsonl").read_text() == whole

    # another scoring setting: the journal of the old one is discarded, every item scored again
    monkeypatch.setattr(nll_module, "reference_nll", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(load_config(overrides=overrides + [f"eval.out={out}"]), progress=False)
    counted.clear()
    monkeypatch.setattr(nll_module, "reference_nll", counting)
    evaluate.run(load_config(overrides=overrides + [f"eval.out={out}", "eval.chat=false"]), progress=False)
    assert sum(counted) == 5


def test_a_machine_that_cannot_sandbox_code_is_told_before_the_model_loads(data_dir, tmp_path):
    """Without `unshare` the code tasks cannot run safely: `pkt eval` stops before loading the model
    (here a path that does not exist, so reaching the load would give another error) and hours of generation."""
    env = {**os.environ, "PATH": "/nonexistent"}
    env.pop("PKT_SANDBOX_WEAK", None)
    result = subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", "eval", str(tmp_path / "no-model"),
                             "--set", f"assets.data_dir={data_dir}", "--set", "eval.tasks=[humaneval]",
                             "--set", f"eval.out={tmp_path / 'out'}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unshare not found on PATH" in result.stderr and "no-model" not in result.stderr
