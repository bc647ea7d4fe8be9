"""Layer Gradient × Activation attribution on the tiny teacher (METHOD.md §1.3)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pkt_pipeline.attribution import accumulate_attribution, attribution_scores
from pkt_pipeline.models import load_model

T = 24


@pytest.fixture(scope="module")
def teacher(tiny_pair):
    return load_model(tiny_pair["teacher"], dtype="float32", device="cpu")


def random_example(seed: int, vocab: int, length: int = T):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (length,), generator=gen)
    supervised = torch.zeros(length, dtype=torch.bool)
    supervised[length // 2 : length - 4] = True  # an answer span, then a few unsupervised tokens
    return ids, supervised


def reference_attribution(model, ids: torch.Tensor, supervised: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent scores {output, contribution} x {abs, signed}: hooks capture h_ℓ, loss by hand,
    ordinary backward.

    h_0 is the embedding output, h_1..h_L the outputs of decoder layers 0..L-1 (h_L before the final
    norm, which transformers 5 applies to the hidden_states[-1] it returns).
    """
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        tensor = output[0] if isinstance(output, tuple) else output
        tensor.retain_grad()
        captured.append(tensor)

    inner = model.model
    modules = [inner.embed_tokens, *inner.layers]
    handles = [module.register_forward_hook(keep) for module in modules]
    try:
        logits = model(input_ids=ids.unsqueeze(0)).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    labels = torch.where(supervised, ids, torch.full_like(ids, -100))
    loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
    loss.backward()
    contributions = [captured[0], *(h - previous for h, previous in zip(captured[1:], captured[:-1]))]
    scores = {}
    for target, activations in (("output", captured), ("contribution", contributions)):
        scores[target, "abs"] = torch.tensor([(h.grad * a).abs().sum().item() for h, a in zip(captured, activations)],
                                             dtype=torch.float64)
        scores[target, "signed"] = torch.tensor([(h.grad * a).sum().item() for h, a in zip(captured, activations)],
                                                dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    return scores


def test_matches_independent_autograd(tiny_pair, teacher):
    reference_model = load_model(tiny_pair["teacher"], dtype="float32", device="cpu")
    ids, supervised = random_example(0, teacher.config.vocab_size)
    expected = reference_attribution(reference_model, ids, supervised)

    for target in ("output", "contribution"):
        scores = attribution_scores(teacher, ids, supervised)[target]
        assert scores.dtype == torch.float64
        assert scores.shape == (teacher.config.num_hidden_layers + 1,)
        assert torch.all(scores > 0)
        torch.testing.assert_close(scores, expected[target, "abs"], rtol=1e-6, atol=0)
        signed = attribution_scores(teacher, ids, supervised, "signed")[target]
        # A signed sum cancels, so its float32 rounding scales with the sum of |terms| (the abs score), not
        # with itself: the CPU's reduction order (AVX2 vs AVX-512) moves it by ~5e-5 of itself. A wrong
        # sign or a missing term would be off by a whole term.
        error = (signed - expected[target, "signed"]).abs()
        assert torch.all(error <= 1e-6 * expected[target, "abs"]), (signed, expected[target, "signed"])
    # h_0 is its own contribution.
    assert expected["contribution", "abs"][0] == expected["output", "abs"][0]


def test_signed_differs_and_is_bounded_by_abs(teacher):
    ids, supervised = random_example(1, teacher.config.vocab_size)
    abs_scores = attribution_scores(teacher, ids, supervised, "abs")["output"]
    signed = attribution_scores(teacher, ids, supervised, "signed")["output"]
    assert not torch.allclose(abs_scores, signed)
    assert torch.all(abs_scores >= signed.abs())


def test_positions_that_feed_nothing_do_not_matter(teacher):
    vocab = teacher.config.vocab_size
    ids, supervised = random_example(2, vocab)
    base = attribution_scores(teacher, ids, supervised)["output"]

    # Unsupervised tokens appended at the end: causal, so nothing before them changes.
    extra = torch.randint(0, vocab, (7,), generator=torch.Generator().manual_seed(3))
    longer = attribution_scores(
        teacher, torch.cat([ids, extra]), torch.cat([supervised, torch.zeros(7, dtype=torch.bool)])
    )["output"]
    torch.testing.assert_close(longer, base, rtol=1e-6, atol=0)

    # Tokens after the last supervised one feed no prediction of a supervised token.
    last = int(supervised.nonzero().max())
    changed = ids.clone()
    changed[last + 1 :] = (changed[last + 1 :] + 1) % vocab
    torch.testing.assert_close(attribution_scores(teacher, changed, supervised)["output"], base, rtol=1e-6, atol=0)

    # A supervised position 0 has no logit predicting it: it contributes nothing.
    with_first = supervised.clone()
    with_first[0] = True
    torch.testing.assert_close(attribution_scores(teacher, ids, with_first)["output"], base, rtol=1e-6, atol=0)


def test_supervision_and_fed_tokens_matter(teacher):
    vocab = teacher.config.vocab_size
    ids, supervised = random_example(4, vocab)
    base = attribution_scores(teacher, ids, supervised)["output"]

    fewer = supervised.clone()
    fewer[int(supervised.nonzero().max())] = False
    assert not torch.allclose(attribution_scores(teacher, ids, fewer)["output"], base)

    changed = ids.clone()
    changed[2] = (changed[2] + 1) % vocab  # an unsupervised prompt token the answer attends to
    assert not torch.allclose(attribution_scores(teacher, changed, supervised)["output"], base)


def test_leaves_no_state_on_the_model(tiny_pair):
    model = load_model(tiny_pair["teacher"], dtype="float32", device="cpu")
    frozen = model.model.layers[0].self_attn.q_proj.weight
    frozen.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    ids, supervised = random_example(5, model.config.vocab_size)

    with torch.no_grad():  # works inside a caller's no_grad block too
        scores = attribution_scores(model, ids, supervised)["output"]
    assert torch.all(scores > 0)
    attribution_scores(model, ids, supervised, "signed")

    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert not model.training

    model.train()  # a model handed over in train mode is scored in eval mode and given back as it was
    torch.testing.assert_close(attribution_scores(model, ids, supervised)["output"], scores, rtol=1e-6, atol=0)
    assert model.training


def test_low_precision_model_gives_float64_scores(tiny_pair, teacher):
    model = load_model(tiny_pair["teacher"], dtype="bfloat16", device="cpu")
    ids, supervised = random_example(6, model.config.vocab_size)
    scores = attribution_scores(model, ids, supervised)["output"]
    assert scores.dtype == torch.float64
    assert torch.all(torch.isfinite(scores)) and torch.all(scores > 0)
    reference = attribution_scores(teacher, ids, supervised)["output"]
    torch.testing.assert_close(scores, reference, rtol=0.2, atol=0)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_bad_inputs(teacher):
    ids, supervised = random_example(7, teacher.config.vocab_size)
    with pytest.raises(ValueError, match="unknown attribution aggregation 'mean'"):
        attribution_scores(teacher, ids, supervised, "mean")
    with pytest.raises(ValueError, match="no supervised token"):
        attribution_scores(teacher, ids, torch.zeros_like(supervised))
    only_first = torch.zeros_like(supervised)
    only_first[0] = True
    with pytest.raises(ValueError, match="no supervised token"):
        attribution_scores(teacher, ids, only_first)
    with pytest.raises(ValueError, match="differ in length"):
        attribution_scores(teacher, ids, supervised[:-1])
    with pytest.raises(ValueError, match="bool mask"):
        attribution_scores(teacher, ids, supervised.long())
    with pytest.raises(ValueError, match="unknown attribution aggregation"):
        accumulate_attribution(teacher, [], aggregation="max")


def test_accumulate_sums_and_skips(teacher, caplog):
    vocab = teacher.config.vocab_size
    pairs = [random_example(seed, vocab, length) for seed, length in ((10, 20), (11, 24), (12, 30))]
    examples = [SimpleNamespace(input_ids=ids.numpy().astype(np.int32), supervised=sup.numpy()) for ids, sup in pairs]
    empty_ids, _ = random_example(13, vocab)
    examples.insert(1, SimpleNamespace(input_ids=empty_ids.numpy(), supervised=np.zeros(T, dtype=bool)))

    with caplog.at_level("WARNING", logger="pkt_pipeline.attribution"):
        scores, used = accumulate_attribution(teacher, examples, progress=False)
    assert used == 3
    assert "skipped 1 example" in caplog.text
    assert set(scores) == {"output", "contribution"}
    for target, values in scores.items():
        assert isinstance(values, np.ndarray) and values.dtype == np.float64
        expected = sum(attribution_scores(teacher, ids, sup)[target] for ids, sup in pairs)
        np.testing.assert_allclose(values, expected.numpy(), rtol=1e-12)

    signed, used = accumulate_attribution(teacher, iter(examples), aggregation="signed", progress=True)
    expected_signed = sum(attribution_scores(teacher, ids, sup, "signed")["output"] for ids, sup in pairs)
    np.testing.assert_allclose(signed["output"], expected_signed.numpy(), rtol=1e-12)

    with pytest.raises(ValueError, match="no example with a supervised token"):
        accumulate_attribution(teacher, [examples[1]], progress=False)
