"""MMLU letter scoring, GSM8K answer extraction and decontamination, each against a reference
computed another way: an unbatched transformers forward, a hand-written table, planted copies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import require_dataset, require_file
from pkt_pipeline.evaluation.decontamination import contaminated_ids, find_contamination, normalise
from pkt_pipeline.evaluation.gsm8k import extract_final_number, gsm8k_prompt, load_gsm8k, numbers_match
from pkt_pipeline.evaluation.mmlu import (
    MmluItem, letter_token_ids, load_mmlu, mmlu_item_text, mmlu_prompt, render_prompt, score_mmlu,
)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- MMLU

ITEMS = [
    MmluItem("t_0", "abstract algebra", "What is 2 + 2?", ("3", "4", "5", "22"), 1),
    MmluItem("t_1", "college biology", "Which organelle makes most of the ATP in a eukaryotic cell, "
             "and why is it called the powerhouse of the cell in every textbook?", ("Nucleus", "Ribosome", "Mitochondrion", "Golgi"), 2),
    MmluItem("t_2", "philosophy", "Who wrote it?", ("Kant", "Hume", "Locke", "Mill"), 0),
    MmluItem("t_3", "high_school_physics", "A ball is dropped from rest. Ignoring air, after 2 s its speed is about",
             ("2 m/s", "9.8 m/s", "19.6 m/s", "40 m/s"), 2),
]


def test_prompt_is_the_standard_layout():
    assert mmlu_prompt(ITEMS[3]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "A ball is dropped from rest. Ignoring air, after 2 s its speed is about\n"
        "A. 2 m/s\nB. 9.8 m/s\nC. 19.6 m/s\nD. 40 m/s\nAnswer:"
    )


def test_load_mmlu_ids_skip_header_rows_and_name_bad_rows(tmp_path):
    row = {"question": "q?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", "correct_answer": "C", "topic": "world religions"}
    header = {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
              "answer_d": "answer_d", "correct_answer": "answer", "topic": "world religions"}
    items = load_mmlu(_write_jsonl(tmp_path / "m.jsonl", [row, header, row, {**row, "topic": "virology"}]))
    assert [i.id for i in items] == ["world_religions_0", "world_religions_1", "virology_0"]
    assert items[0].answer == 2 and items[0].choices == ("a", "b", "c", "d")
    with pytest.raises(ValueError, match=r"m2.jsonl:2: not an MMLU row"):
        load_mmlu(_write_jsonl(tmp_path / "m2.jsonl", [row, {**row, "correct_answer": "E"}]))


def test_real_mmlu_file_loads_14042_items():
    items = load_mmlu(require_dataset("mmlu"))
    assert len(items) == 14042 and len({i.id for i in items}) == 14042
    assert len({i.subject for i in items}) == 57


@pytest.fixture(scope="module")
def tiny_lm(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_pair["teacher"])


def test_letter_spellings_cover_both_forms(tiny_lm):
    _, tokenizer = tiny_lm
    ids = letter_token_ids(tokenizer)
    # The tiny BPE learned " A" as one token but splits " B" into " " + "B": A has two spellings, B one.
    assert ids[0] == [tokenizer.convert_tokens_to_ids("A"), tokenizer.convert_tokens_to_ids("ĠA")]
    assert ids[1] == [tokenizer.convert_tokens_to_ids("B")]


@pytest.mark.parametrize("chat", [True, False])
def test_batched_scores_equal_unbatched_forward(tiny_lm, chat):
    model, tokenizer = tiny_lm
    results = score_mmlu(model, tokenizer, ITEMS, batch_size=3, chat=chat, progress=False)
    spellings = {letter: [s for s in (letter, " " + letter) if len(tokenizer.encode(s, add_special_tokens=False)) == 1]
                 for letter in "ABCD"}
    lengths = set()
    for item, result in zip(ITEMS, results):
        text = render_prompt(item, tokenizer, chat)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).input_ids
        lengths.add(ids.shape[1])
        with torch.no_grad():
            logprobs = model(ids).logits[0, -1].log_softmax(-1)
        expected = {}
        for letter, forms in spellings.items():
            values = [logprobs[tokenizer.encode(f, add_special_tokens=False)[0]].item() for f in forms]
            expected[letter] = math.log(sum(math.exp(v) for v in values))
        assert result["id"] == item.id and result["prompt"] == text
        for letter in "ABCD":
            assert result["letter_logprobs"][letter] == pytest.approx(expected[letter], abs=1e-4)
        assert result["prediction"] == max(expected, key=expected.get)
        assert result["answer"] == "ABCD"[item.answer]
        assert result["correct"] == (result["prediction"] == result["answer"])
        # p_correct: a hand softmax over the four letters' log-probs, read at the correct one
        normaliser = sum(math.exp(expected[letter]) for letter in "ABCD")
        assert result["p_correct"] == pytest.approx(math.exp(expected["ABCD"[item.answer]]) / normaliser, abs=1e-4)
        assert result["log_p_correct"] == pytest.approx(math.log(result["p_correct"]))
    assert len(lengths) == len(ITEMS)  # every batch mixes lengths, so left padding is exercised


# ---------------------------------------------------------------- GSM8K

EXTRACTION_CASES = [
    ("So the answer is 24.", "24"),
    ("Janet makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The total is 1,234 apples. So the answer is 1,234.", "1234"),
    ("She pays $1,200.50 in total.", "1200.5"),
    ("He runs 12 km.", "12"),
    ("The temperature drops to -5 degrees. The answer is -5.", "-5"),
    ("Each costs 3.50 dollars, so the answer is 3.50", "3.5"),
    ("16-3-4=9 eggs, which sell for 18 dollars", "18"),
    ("The answer is 72. Check: 48 + 24 = 72 and 1 + 1 = 2.", "72"),
    ("#### 72", "72"),
    ("1 + 2 = 3, then 3 * 4 = 12", "12"),
    ("The answer is: 45 minutes", "45"),
    ("She lost $-30? No: the answer is -$30.", "-30"),
    ("So the answer is 0.", "0"),
    ("The answer is 5.00.", "5"),
    ("Tickets sold: 12,000,000. That is the answer.", "12000000"),
    ("The answer is \\boxed{42}.", "42"),
    ("50% of 80 is 40%", "40"),
    ("It takes 2/2=<<2/2=1>>1 bolt\n#### 3", "3"),
    ("There is no number here.", None),
    ("", None),
    ("The Answer Is 7 cats, not 8.", "7"),
    ("Result: .5 of the pie", "0.5"),
    ("the answer is (−12)", "-12"),
    ("1,23 is not grouped by three", "23"),
    ("The answer is 100 and then some more text follows with 3 numbers", "100"),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


@pytest.mark.parametrize("a,b,same", [
    ("3.50", "3.5", True), ("$1,200", "1200", True), ("1200.0", "1,200", True), ("-0", "0", True),
    ("12", "12.01", False), ("5", None, False), (None, None, False), ("seven", "7", False), ("-3", "3", False),
])
def test_numbers_match(a, b, same):
    assert numbers_match(a, b) is same


def test_every_reference_answer_parses():
    items = load_gsm8k(require_file(require_dataset("gsm8k") / "test.jsonl"), limit=200)
    assert len(items) == 200
    for item in items:
        written = item.answer.rsplit("####", 1)[1].strip().replace(",", "")
        assert numbers_match(item.reference, written), (item.id, item.answer[-40:], item.reference)
    assert items[0].reference == "18"
    assert gsm8k_prompt(items[0].question).startswith("Answer the following question.")
    assert gsm8k_prompt(items[0].question).endswith("Question: " + items[0].question.strip())


# ---------------------------------------------------------------- decontamination

QUESTION = ("A builder had a contract to build a swimming pool for a residential customer, but the next door "
            "neighbor paid him extra to break the contract. Does the customer have a valid claim?")


def _transfer(tmp_path: Path, users: list[str]) -> Path:
    rows = [{"id": f"mmlu_{i}", "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": "The answer is: A"}]}
            for i, u in enumerate(users)]
    return _write_jsonl(tmp_path / "train.jsonl", rows)


def test_normalise():
    assert normalise("  Hello,\n\tWORLD!  It's  A.polydactyly ") == "hello world it s a polydactyly"


def test_planted_copies_are_caught_and_disjoint_items_are_not(tmp_path):
    shouted = "THE FOLLOWING are multiple choice questions.\n\n" + "  ".join(QUESTION.upper().split()) + "\nAnswer:"
    path = _transfer(tmp_path, ["Something else entirely.", "Intro.\n\n" + QUESTION + "\nA. yes\nB. no", shouted])
    tests = {
        "exact": QUESTION,
        "short": "Who wrote it?",  # under 13 words, not in any message
        "disjoint": "The mitochondrion is where most of the ATP of a eukaryotic cell is made by oxidative phosphorylation.",
        "overlap": "Unrelated opening words. " + " ".join(QUESTION.split()[:14]) + " ... and a different ending?",
        "short_copy": "something ELSE entirely",
    }
    matches = find_contamination(tests, [path])
    assert set(matches) == {"exact", "overlap", "short_copy"}
    assert matches["exact"].rule == "contained" and matches["exact"].transfer_id == "mmlu_1"
    assert matches["overlap"].rule == "13-gram" and len(matches["overlap"].evidence.split()) == 13
    assert matches["short_copy"].transfer_id == "mmlu_0"
    # The case/whitespace-changed copy alone catches the question too.
    shouted_only = _transfer(tmp_path, [shouted])
    assert contaminated_ids({"exact": QUESTION, "disjoint": tests["disjoint"]}, [shouted_only]) == {"exact"}


def test_boilerplate_shared_by_many_test_items_is_not_evidence(tmp_path):
    stem = "For which of these two scenarios does the main character do something clearly morally wrong, according to ordinary standards?"
    tests = {f"moral_{i}": f"{stem} Scenario {i}: I did thing number {i}." for i in range(12)}
    path = _transfer(tmp_path, [f"{stem} Scenario: I painted the fence green."])
    assert contaminated_ids(tests, [path]) == set()
    assert contaminated_ids(tests, [path], max_item_frequency=12) == set(tests)
    copied = _transfer(tmp_path, [tests["moral_3"]])
    assert contaminated_ids(tests, [copied]) == {"moral_3"}  # an exact copy is caught, boilerplate or not


def test_real_transfer_splits_overlap():
    """Measured, not pinned: SOURCES.md says the mmlu splits hold MMLU test rows and gsm none."""
    transfer = require_dataset("transfer-splits")
    splits = ("train", "align", "extract")
    mmlu = load_mmlu(require_dataset("mmlu"))
    mmlu_hits = find_contamination({i.id: mmlu_item_text(i) for i in mmlu},
                                   [require_file(transfer / "mmlu" / f"{s}.jsonl") for s in splits])
    gsm = load_gsm8k(require_file(require_dataset("gsm8k") / "test.jsonl"))
    gsm_hits = contaminated_ids({i.id: i.question for i in gsm}, [require_file(transfer / "gsm" / f"{s}.jsonl") for s in splits])
    exact = sum(m.rule == "contained" for m in mmlu_hits.values())
    print(f"\nMMLU test items overlapping mmlu transfer splits: {len(mmlu_hits)} of {len(mmlu)} ({exact} verbatim); "
          f"GSM8K test items overlapping gsm splits: {len(gsm_hits)} of {len(gsm)}")
    assert gsm_hits == set()
    assert exact > 0 and len(mmlu_hits) < len(mmlu) // 10


# ---------------------------------------------------------------- reference NLL (the generative tasks' continuous metric)

def test_reference_nll_equals_a_plain_forward_loss(tiny_lm):
    """Batched, left-padded, LM head on the target columns only: the same number as transformers'
    own loss of one unbatched forward with the context masked out of the labels."""
    from pkt_pipeline.evaluation.reference_nll import reference_nll

    model, tokenizer = tiny_lm
    contexts = ["Question: what is 2 + 2?\n", "Q: name a colour.", "A much longer question about the history of "
                "the powerhouse of the cell, asked at length so that batches mix very different lengths. "]
    targets = ["Answer: 4. So the answer is 4.", " Blue", " It is the mitochondrion, as every textbook says."]
    results = reference_nll(model, tokenizer, contexts, targets, batch_size=2, progress=False)
    for context, target, result in zip(contexts, targets, results):
        context_ids = tokenizer.encode(context, add_special_tokens=False)
        target_ids = tokenizer.encode(target, add_special_tokens=False)
        input_ids = torch.tensor([context_ids + target_ids])
        labels = torch.tensor([[-100] * len(context_ids) + target_ids])
        with torch.no_grad():
            expected = model(input_ids=input_ids, labels=labels).loss.item()
        assert result["tokens"] == len(target_ids)
        assert result["nll"] == pytest.approx(expected, abs=1e-4)


def test_reference_nll_refuses_mismatched_or_empty_input(tiny_lm):
    from pkt_pipeline.evaluation.reference_nll import reference_nll

    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="2 contexts but 1 targets"):
        reference_nll(model, tokenizer, ["a", "b"], ["c"], progress=False)
    with pytest.raises(ValueError, match="item 0: empty target"):
        reference_nll(model, tokenizer, ["a"], [""], progress=False)


def test_gsm8k_reference_reply_has_the_transfer_split_format():
    from pkt_pipeline.evaluation.gsm8k import GsmItem, reference_reply

    item = GsmItem("gsm8k_0", "q", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72", "72")
    assert reference_reply(item) == "Answer: Natalia sold 48/2 = 24 clips in May. In all 48+24 = 72 clips. So the answer is 72."
