"""`alm` and what it stands on: the teacher's next-token log-probs in the cache against a plain forward, the chunk
likelihoods against sums of token log-probs of real tiny models, the binarised divergence by hand, and the whole
pipeline (`pkt extract` + `pkt align --method alm`) with a student of another tokenizer."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pkt_pipeline.cache import CacheError, open_cache
from pkt_pipeline.config import load_config
from pkt_pipeline.losses import binarised_likelihood_divergence
from pkt_pipeline.tiny_models import save_tiny_cross_student
from stages import align
from test_uld import FAST, cross_method, extract_then_align


@pytest.fixture(scope="module")
def cross_student(tmp_path_factory):
    return save_tiny_cross_student(tmp_path_factory.mktemp("cross") / "student")


def token_logprobs(model_dir, ids: np.ndarray) -> np.ndarray:
    """[T - 1] log p(token t+1 | <= t) of a plain float32 forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0]
    following = torch.from_numpy(ids[1:].astype(np.int64))[:, None]
    return torch.log_softmax(logits.double(), -1)[:-1].gather(1, following)[:, 0].numpy()


def test_the_cache_holds_the_teachers_log_prob_of_each_next_token(tiny_pair, tiny_cache):
    cache = open_cache(tiny_cache)
    assert cache.manifest.cross_tokenizer.target_logprob == "target_logprob"
    assert cache.manifest.identity["cross_tokenizer"]["target_logprob"] == "target_logprob"
    for example_id in cache.index.column("example_id").to_pylist()[:4]:
        ids = cache.tokens(example_id)
        stored = cache.target_logprob(example_id)
        assert stored.shape == (len(ids),) and stored.dtype == np.float32 and stored[-1] == 0.0
        np.testing.assert_allclose(stored[:-1], token_logprobs(tiny_pair["teacher"], ids), atol=2e-5)
        # where the teacher ranked the token in its top-k, the two stored log-probs agree
        values, indices = cache.topk(example_id)
        hit = indices[:-1] == torch.from_numpy(ids[1:].astype(np.int64))[:, None]
        rows = hit.any(1).numpy()
        assert rows.any()
        np.testing.assert_allclose(stored[:-1][rows], values[:-1][hit].numpy(), atol=1e-6)


def test_binarised_divergence_matches_a_hand_computation():
    student, teacher = torch.tensor([-3.0, -0.5]), torch.tensor([-2.0, -0.5])
    expected = []
    for s, t in zip(student.tolist(), teacher.tolist()):
        ps, pt = math.exp(s / 10 - 1e-6), math.exp(t / 10 - 1e-6)
        expected.append(-(pt * math.log(ps) + (1 - pt) * math.log(1 - ps)))
    assert binarised_likelihood_divergence(student, teacher, 10.0).item() == pytest.approx(np.mean(expected), rel=1e-5)
    kl = binarised_likelihood_divergence(student, teacher, 10.0, "binary_kl")
    pt, ps = math.exp(-0.2 - 1e-6), math.exp(-0.3 - 1e-6)
    assert kl.item() == pytest.approx((pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))) / 2, rel=1e-4)
    assert binarised_likelihood_divergence(teacher, teacher, 10.0, "binary_kl").item() == pytest.approx(0, abs=1e-6)
    assert binarised_likelihood_divergence(torch.zeros(0), torch.zeros(0)).item() == 0.0
    with pytest.raises(ValueError, match="divergence must be one of"):
        binarised_likelihood_divergence(student, teacher, divergence="tvd")


def test_alm_chunk_likelihoods_are_sums_of_token_log_probs_inside_each_chunk(tiny_pair, tiny_cache, cross_student,
                                                                            tmp_path):
    """The method's chunk log-likelihoods and loss on one batch against plain forwards of both real tiny models,
    summed by hand over each aligned chunk's tokens."""
    from pkt_pipeline.loader import CacheLoader

    method, cache, aligned, model = cross_method("alm", tiny_cache, cross_student, tmp_path, "methods.alm.ce_weight=0.5")
    with CacheLoader(cache, batch_size=4, topk=False, student=aligned, target_logprob=True) as loader:
        batch = next(iter(loader))
    with torch.no_grad():
        student_logp, teacher_logp, _ = method.chunk_likelihoods(model, batch)
        loss, parts = method.loss(model, batch, None)
    want_student, want_teacher, ce_terms = [], [], []
    for example_id in batch.example_ids:
        own = aligned[example_id]
        teacher_logps = token_logprobs(tiny_pair["teacher"], cache.tokens(example_id))  # [T-1]: index i-1 scores token i
        student_logps = token_logprobs(cross_student, own.input_ids)
        teacher_supervised = cache.supervised(example_id)
        ce_terms += [-student_logps[i - 1] for i in range(1, len(own.input_ids)) if own.supervised[i]]
        for t0, t1, s0, s1 in own.alignment.chunks.tolist():
            if t0 >= 1 and s0 >= 1 and teacher_supervised[t0:t1].all() and own.supervised[s0:s1].all():
                want_teacher.append(sum(teacher_logps[i - 1] for i in range(t0, t1)))
                want_student.append(sum(student_logps[i - 1] for i in range(s0, s1)))
    assert len(want_teacher) >= 4
    np.testing.assert_allclose(teacher_logp.numpy(), want_teacher, atol=1e-4)
    np.testing.assert_allclose(student_logp.numpy(), want_student, atol=1e-4)
    expected_alm = []
    for s, t in zip(want_student, want_teacher):
        ps, pt = math.exp(s / 100 - 1e-6), math.exp(t / 100 - 1e-6)
        expected_alm.append(-(pt * math.log(ps) + (1 - pt) * math.log(1 - ps)))
    assert parts["alm"] == pytest.approx(np.mean(expected_alm), rel=1e-4)
    assert parts["ce"] == pytest.approx(np.mean(ce_terms), rel=1e-4)
    assert loss.item() == pytest.approx(np.mean(expected_alm) + 0.5 * np.mean(ce_terms), rel=1e-4)
    assert method.loss_units(batch, None) == {"chunks": len(want_teacher), "student_tokens": len(ce_terms)}


@pytest.mark.integration
def test_pkt_extract_then_pkt_align_alm_trains_a_student_with_another_tokenizer(tiny_pair, tiny_dataset,
                                                                                cross_student, tmp_path):
    out, log, _ = extract_then_align(tiny_pair, tiny_dataset, cross_student, tmp_path, "alm", "align.steps=3",
                                     "align.micro_batch_size=2")
    assert len(log) == 3 and all(entry["alm"] > 0 and entry["ce"] > 0 for entry in log)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "alm" and metrics["steps"] == 3
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model").config.vocab_size == 320


def test_a_cache_without_the_teachers_next_token_log_probs_is_refused_for_alm(tiny_cache, cross_student, tmp_path):
    old = tmp_path / "old-cache"
    shutil.copytree(tiny_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["cross_tokenizer"]["target_logprob"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert open_cache(old).manifest.cross_tokenizer.target_logprob is None  # still readable, by uld too
    config = load_config(overrides=[f"student={cross_student}", f"align.cache={old}",
                                    f"align.out={tmp_path / 'out'}", "align.method=alm", *FAST])
    with pytest.raises(CacheError) as error:
        align.run(config, progress=False)
    message = str(error.value)
    assert message.startswith("method alm needs the teacher's log-prob of each token actually in the text "
                              "(`target_logprob`")
    assert str(old) in message and "has no `target_logprob`" in message
    assert "Re-extract it with this pkt (`pkt extract --overwrite` and the same settings)" in message
    assert not (tmp_path / "out").exists()
