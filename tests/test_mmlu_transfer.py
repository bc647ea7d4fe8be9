"""MMLU transfer splits carved from the test set when the published ones are absent: the published
row format and sizes, disjoint splits, and an evaluation set disjoint from them by construction."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pkt_pipeline.evaluation.mmlu import LETTERS, load_mmlu, mmlu_prompt
from pkt_pipeline.evaluation.tasks import drop_contaminated, get_task
from pkt_pipeline.examples import load_examples
from pkt_pipeline.models import load_tokenizer
from pkt_pipeline.mmlu_transfer import SPLIT_SIZES, carve_mmlu_transfer
from stages import assets


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """A data folder with a synthetic MMLU test file, and no shared data folder anywhere."""
    monkeypatch.setenv("PKT_SHARED_DATA", str(tmp_path / "no-shared"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("pkt_pipeline.datasets.PROJECT_ROOT", tmp_path / "checkout")
    rng = random.Random(1)
    data = tmp_path / "data"
    (data / "mmlu").mkdir(parents=True)
    with open(data / "mmlu" / "test.jsonl", "w") as sink:
        for i in range(2400):
            words = " ".join(rng.choice(["atom", "court", "tariff", "enzyme", "proof", "river"]) for _ in range(12))
            sink.write(json.dumps({"question": f"Question {i}: {words}?", "answer_a": f"a{i}", "answer_b": f"b{i}",
                                   "answer_c": f"c{i}", "answer_d": f"d{i}", "correct_answer": "ABCD"[i % 4],
                                   "topic": ["college biology", "world history"][i % 2]}) + "\n")
    return data


def test_carved_splits_have_the_published_format_and_are_disjoint(isolated, tiny_pair, tmp_path):
    written = carve_mmlu_transfer(isolated / "mmlu" / "test.jsonl", tmp_path / "splits", seed=3)
    items = {item.id: item for item in load_mmlu(isolated / "mmlu" / "test.jsonl")}
    seen = set()
    for split, size in SPLIT_SIZES.items():
        rows = [json.loads(line) for line in written[split].read_text().splitlines()]
        assert len(rows) == size
        for row in rows:
            item = items[row["test_item_id"]]
            assert row["messages"] == [{"role": "user", "content": mmlu_prompt(item)},
                                       {"role": "assistant", "content": f"The answer is: {LETTERS[item.answer]}"}]
        ids = {row["test_item_id"] for row in rows}
        assert len(ids) == size and not ids & seen
        seen |= ids
    examples, counts = load_examples(written["extract"], load_tokenizer(tiny_pair["teacher"]))
    assert counts["examples"] == SPLIT_SIZES["extract"] and all(e.supervised.any() for e in examples)
    again = carve_mmlu_transfer(isolated / "mmlu" / "test.jsonl", tmp_path / "again", seed=3)
    assert again["train"].read_bytes() == written["train"].read_bytes()


def test_assets_carve_once_and_evaluation_drops_exactly_the_carved_items(isolated):
    messages = []
    first = assets._mmlu_transfer_splits(isolated, messages.append)
    assert first["action"] == "carved" and "carved 1100 rows" in messages[0]
    assert assets._mmlu_transfer_splits(isolated, messages.append)["action"] == "located"

    items = load_mmlu(isolated / "mmlu" / "test.jsonl")
    kept, dropped = drop_contaminated(get_task("mmlu"), items, str(isolated))
    carved = {json.loads(line)["test_item_id"] for split in SPLIT_SIZES
              for line in (isolated / "transfer-splits" / "mmlu" / f"{split}.jsonl").read_text().splitlines()}
    assert dropped == len(carved) == sum(SPLIT_SIZES.values())
    assert {item.id for item in kept} == {item.id for item in items} - carved


def test_carving_too_much_of_a_small_test_set_is_refused(isolated, tmp_path):
    with pytest.raises(ValueError, match="would leave too little to evaluate on"):
        carve_mmlu_transfer(isolated / "mmlu" / "test.jsonl", tmp_path / "splits", sizes={"train": 1500})
