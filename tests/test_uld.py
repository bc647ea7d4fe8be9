"""`uld` and what it stands on: the cache's cross-tokenizer record, the loss against a hand computation, and the
whole pipeline (`pkt extract` + `pkt align --method uld`) on tiny models with different tokenizers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pkt_pipeline.cache import CacheError, open_cache
from pkt_pipeline.config import load_config
from pkt_pipeline.examples import format_example
from pkt_pipeline.losses import sorted_probability_distance
from pkt_pipeline.methods import AlignContext, get_method, resolve
from pkt_pipeline.tiny_models import save_tiny_cross_student
from pkt_pipeline.xtok import align_cache
from stages import align
from tiny_data import SMALL_LAYOUT

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
FAST = ["runtime.dtype=float32", "align.batch_size=4", "align.lr=5e-3", "align.loader.shuffle_buffer=8",
        "align.lora.r=4", "align.lora.alpha=8", "align.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def cross_student(tmp_path_factory) -> Path:
    return save_tiny_cross_student(tmp_path_factory.mktemp("cross") / "student")


def test_sorted_probability_distance_matches_a_hand_computation():
    # teacher top-2 probabilities 0.5, 0.3; student softmax [0.1, 0.2, 0.7] -> its top-2 sorted 0.7, 0.2
    teacher = torch.tensor([[math.log(0.3), math.log(0.5)]])  # the order of the cached k does not matter
    student = torch.log(torch.tensor([[0.1, 0.2, 0.7]]))
    assert sorted_probability_distance(student, teacher).item() == pytest.approx(abs(0.5 - 0.7) + abs(0.3 - 0.2))
    # k = 4 above a 3-token student vocabulary: its probabilities are padded with a zero
    teacher = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert sorted_probability_distance(student, teacher).item() == pytest.approx(0.3 + 0.1 + 0.1 + 0.1)
    # the mean over rows; no rows is zero, not NaN
    both = sorted_probability_distance(torch.cat([student, student]), torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1],
                                                                                             [0.7, 0.2, 0.1, 1e-30]])))
    assert both.item() == pytest.approx((0.6 + 0.0) / 2, abs=1e-6)
    assert sorted_probability_distance(torch.zeros(0, 3), torch.zeros(0, 2)).item() == 0.0


def test_the_cache_records_spans_sources_and_the_teacher_tokenizer(tiny_pair, tiny_cache):
    from transformers import AutoTokenizer

    cache = open_cache(tiny_cache)
    record = cache.manifest.cross_tokenizer
    assert record is not None and record.spans == "spans" and record.tokenizer_dir == "tokenizer"
    assert cache.manifest.identity["cross_tokenizer"] == record.to_json()
    teacher = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    stored = cache.teacher_tokenizer()
    assert stored.get_vocab() == teacher.get_vocab() and stored.chat_template == teacher.chat_template
    for example_id in cache.index.column("example_id").to_pylist()[:3]:
        messages, text = cache.source(example_id)
        example = format_example({"messages": messages}, stored, example_id=example_id)
        assert example.text == text and example.content_hash == cache.content_hash(example_id)
        assert cache.tokens(example_id).tolist() == example.input_ids.tolist()
        assert cache.spans(example_id).tolist() == example.offsets.tolist()
        assert "".join(text[a:b] for a, b in cache.spans(example_id)) == text  # ChatML: every character covered once


def cross_method(name: str, cache_path, student, out, *overrides: str):
    """(method, cache, aligned examples, student model): method `name` set up as stage two sets it up for a student
    with another tokenizer, on the cache at `cache_path`."""
    from pkt_pipeline.models import load_model, load_tokenizer

    config = load_config(overrides=[f"student={student}", f"align.cache={cache_path}", f"align.out={out}",
                                    f"align.method={name}", *overrides, *FAST])
    resolved = resolve(config, name)
    cache = open_cache(cache_path)
    tokenizer = load_tokenizer(str(student))
    model = load_model(str(student), dtype="float32", device="cpu")
    method = get_method(name)(AlignContext(cache, resolved.align, tokenizer, settings=resolved.settings))
    return method, cache, align_cache(cache, tokenizer), model


def test_uld_loss_is_ce_plus_weighted_w1_at_the_aligned_pairs(tiny_cache, cross_student, tmp_path):
    """The method's loss on one batch against the same terms computed by hand from the alignment."""
    from pkt_pipeline.loader import CacheLoader

    method, cache, aligned, model = cross_method("uld", tiny_cache, cross_student, tmp_path)
    with CacheLoader(cache, batch_size=4, topk=True, student=aligned) as loader:
        batch = next(iter(loader))
    with torch.no_grad():
        loss, parts = method.loss(model, batch, None)
    ce_terms, w1_terms = [], []
    for row, example_id in enumerate(batch.example_ids):
        own = aligned[example_id]
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(own.input_ids.astype(np.int64))[None]).logits[0].float(), -1)
        answer_next = np.flatnonzero(own.supervised[1:])  # positions s whose next token is supervised
        ce_terms += [-math.log(probs[s, own.input_ids[s + 1]].item()) for s in answer_next]
        teacher_supervised = cache.supervised(example_id)
        logprobs, _ = cache.topk(example_id)
        for t, s in own.alignment.pairs.tolist():
            if t + 1 < len(teacher_supervised) and s + 1 < len(own.input_ids) and teacher_supervised[t + 1] \
                    and own.supervised[s + 1]:
                p_teacher = sorted(logprobs[t].exp().tolist(), reverse=True)
                p_student = sorted(probs[s].tolist(), reverse=True)[:len(p_teacher)]
                w1_terms.append(sum(abs(a - b) for a, b in zip(p_teacher, p_student)))
    assert len(w1_terms) >= 4 and len(ce_terms) >= 4
    assert parts["ce"] == pytest.approx(np.mean(ce_terms), rel=1e-4)
    assert parts["uld"] == pytest.approx(np.mean(w1_terms), rel=1e-4)
    assert loss.item() == pytest.approx(1.0 * np.mean(ce_terms) + 1.5 * np.mean(w1_terms), rel=1e-4)
    assert method.loss_units(batch, None)["pairs"] == len(w1_terms)


def pkt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(PROJECT_ROOT)])}
    return subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def extract_then_align(tiny_pair, tiny_dataset, cross_student, tmp_path: Path, method: str, *settings: str,
                       flags: tuple[str, ...] = ()) -> tuple[Path, list[dict], subprocess.CompletedProcess]:
    """`pkt extract` a tiny cache with the teacher, then `pkt align` the other-tokenizer student from it by
    `method` (with `flags` and `--set` each of `settings`): the run's folder, its per-step log and the align run."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    as_flags = lambda items: [x for item in items for x in ("--set", item)]  # noqa: E731
    done = pkt("extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(tiny_dataset), "--out", str(cache),
               "--no-progress", *as_flags(["runtime.dtype=float32", "extract.limit=12", *SMALL_LAYOUT]))
    assert done.returncode == 0, done.stderr
    done = pkt("align", "--cache", str(cache), "--student", str(cross_student), "--method", method, "--out", str(out),
               "--no-progress", *flags, *as_flags([*FAST, *settings]))
    assert done.returncode == 0, done.stderr
    return out, [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()], done


@pytest.mark.integration
def test_pkt_extract_then_pkt_align_uld_trains_a_student_with_another_tokenizer(tiny_pair, tiny_dataset, cross_student,
                                                                                tmp_path):
    out, log, _ = extract_then_align(tiny_pair, tiny_dataset, cross_student, tmp_path, "uld", "align.steps=3")
    assert len(log) == 3 and all(entry["uld"] > 0 and entry["ce"] > 0 for entry in log)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "uld" and metrics["steps"] == 3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "model")
    assert len(saved) == 320 and AutoModelForCausalLM.from_pretrained(out / "model").config.vocab_size == 320


def test_a_shared_vocabulary_method_still_refuses_the_other_tokenizer_naming_itself(tiny_cache, cross_student,
                                                                                   tmp_path):
    config = load_config(overrides=[f"student={cross_student}", f"align.cache={tiny_cache}",
                                    f"align.out={tmp_path / 'out'}", "align.method=kd", *FAST])
    with pytest.raises(CacheError) as error:
        align.run(config, progress=False)
    message = str(error.value)
    assert "does not match the cache" in message and "320 tokens" in message and "384 tokens" in message
    assert "Method kd trains on the cached token ids" in message
    assert "use a method that works across tokenizers (alm, semalign-xvocab, uld)" in message
    assert not (tmp_path / "out").exists()


def test_a_cache_from_before_the_cross_tokenizer_record_is_refused_for_uld(tiny_cache, cross_student, tmp_path):
    old = tmp_path / "old-cache"
    shutil.copytree(tiny_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["cross_tokenizer"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert open_cache(old).manifest.cross_tokenizer is None  # still readable
    config = load_config(overrides=[f"student={cross_student}", f"align.cache={old}",
                                    f"align.out={tmp_path / 'out'}", "align.method=uld", *FAST])
    with pytest.raises(CacheError) as error:
        align.run(config, progress=False)
    message = str(error.value)
    assert message.startswith("method uld needs a cache that records what a student with another tokenizer needs")
    assert str(old) in message and "no `cross_tokenizer`" in message
    assert "Re-extract it with this pkt (`pkt extract --overwrite` and the same settings)" in message
    assert not (tmp_path / "out").exists()
