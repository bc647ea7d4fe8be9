"""The stage-two losses against independent references: torch's own cross-entropy, dense distributions
built explicitly, explicit matrix forms, per-position loops and hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pkt_pipeline import losses
from pkt_pipeline.loader import Batch
from pkt_pipeline.methods.base import next_token_positions
from pkt_pipeline.losses import (cosine_loss, cross_entropy, fisher_surrogate, label_cosine_loss, linear_cka,
                                 next_token_mask, relation_loss, topk_kl)

V, K = 7, 3


def padded_batch(seed: int = 0):
    """Right-padded batch of 3 (lengths 6, 5, 4) with prompt/answer marks, and its next-token mask."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    supervised = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]).bool() & attention.bool()
    input_ids = torch.randint(0, V, (3, 6), generator=g)
    return g, input_ids, supervised, attention, next_token_mask(supervised, attention)


def with_garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with NaN in every position outside mask: no loss may read it."""
    return torch.where(mask[..., None], x, torch.full_like(x, float("nan")))


def test_next_token_mask_by_hand():
    supervised = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.uint8)
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]).bool()
    assert torch.equal(next_token_mask(supervised, attention), expected)
    # A supervised mark on padding does not count, nor does a real token predicted from padding.
    supervised[1, 3] = 1
    supervised[2, 2] = 1
    assert torch.equal(next_token_mask(supervised, attention), expected)
    with pytest.raises(ValueError, match="supervised"):
        next_token_mask(supervised[:, :4], attention)


def test_student_positions_use_the_same_next_token_mask():
    supervised = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]).bool()
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    batch = Batch(["a", "b"], input_ids, attention, supervised, {}, None, None)
    positions, targets = next_token_positions(batch)
    assert torch.equal(positions, torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]).bool())
    assert targets.tolist() == [7, 8, 9, 11, 12]


def test_cross_entropy_matches_torch_with_hf_labels():
    g, input_ids, supervised, attention, mask = padded_batch()
    logits = torch.randn(3, 6, V, generator=g)
    labels = torch.where(supervised, input_ids, -100)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(cross_entropy(with_garbage(logits, mask), input_ids, mask), reference, atol=1e-6)
    # The gathered form methods.base.forward_student produces: logits at the mask, their next tokens.
    targets = input_ids[:, 1:][mask[:, :-1]]
    assert torch.allclose(cross_entropy(logits[mask], targets), reference, atol=1e-6)


def test_cross_entropy_refuses_a_mask_at_the_last_position_and_integer_masks():
    _, input_ids, supervised, _, mask = padded_batch()
    logits = torch.randn(3, 6, V)
    with pytest.raises(ValueError, match="last position"):
        cross_entropy(logits, input_ids, supervised)
    with pytest.raises(TypeError, match="bool"):
        cross_entropy(logits, input_ids, mask.long())
    with pytest.raises(ValueError, match="mask"):
        cross_entropy(logits, input_ids, mask[:, :5])


def dense_topk_kl(student_logits, teacher_logprobs, teacher_indices, mask, mode, temperature):
    """Slow reference: per position, build both full V-sized distributions, then the (k+1)- or
    k-category distributions by explicit sums, and the KL in float64."""
    total, count = 0.0, 0
    for b, t in mask.nonzero().tolist():
        q = torch.softmax(student_logits[b, t].double() / temperature, -1)
        idx = teacher_indices[b, t].tolist()
        others = [v for v in range(q.numel()) if v not in idx]
        p_top = teacher_logprobs[b, t].double().exp()
        if temperature != 1.0:
            p_top = p_top ** (1 / temperature)
            p_top = p_top / p_top.sum()
        q_top = q[idx]
        if mode == "rest" and others:
            p_cat = torch.cat([p_top, (1 - p_top.sum()).clamp_min(0)[None]])
            q_cat = torch.cat([q_top, q[others].sum()[None]])
        elif mode == "rest":  # k == V: no tail, only rounding left in 1 - sum(p)
            p_cat, q_cat = p_top, q_top
        else:
            p_cat, q_cat = p_top / p_top.sum(), q_top / q_top.sum()
        total += sum(float(pi * math.log(pi / qi)) for pi, qi in zip(p_cat, q_cat) if pi > 0)
        count += 1
    return total * temperature**2 / count


def teacher_topk(logits: torch.Tensor, k: int = K):
    values, indices = torch.log_softmax(logits, -1).topk(k, -1)
    return values, indices


@pytest.mark.parametrize("mode", ["rest", "renormalise"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_topk_kl_matches_dense_distributions(mode, temperature):
    g, _, _, _, mask = padded_batch(1)
    student = torch.randn(3, 6, V, generator=g) * 2
    logprobs, indices = teacher_topk(torch.randn(3, 6, V, generator=g) * 2)
    got = topk_kl(with_garbage(student, mask), logprobs, indices, mask, mode=mode, temperature=temperature)
    expected = dense_topk_kl(student, logprobs, indices, mask, mode, temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert got.item() > 0


def test_topk_kl_is_zero_when_the_student_matches_the_teacher():
    g, _, _, _, mask = padded_batch(2)
    teacher = torch.randn(3, 6, V, generator=g)
    logprobs, indices = teacher_topk(teacher)
    # rest: the same full distribution has the same top-k and the same leftover mass.
    assert topk_kl(teacher + 5.0, logprobs, indices, mask).abs().item() < 1e-6
    # renormalise: only the odds among the k count; mass elsewhere is free.
    student = (torch.randn(3, 6, V, generator=g) * 10).scatter(-1, indices, teacher.gather(-1, indices) - 3.0)
    assert topk_kl(student, logprobs, indices, mask, mode="renormalise").abs().item() < 1e-6
    assert topk_kl(student, logprobs, indices, mask, mode="rest").item() > 0.1


def test_topk_kl_stays_finite_at_the_edges():
    g, _, _, _, mask = padded_batch(3)
    student = torch.randn(3, 6, V, generator=g, requires_grad=True)
    # k == V: the rest bucket is empty on both sides.
    logprobs, indices = teacher_topk(torch.randn(3, 6, V, generator=g), k=V)
    loss = topk_kl(student, logprobs, indices, mask)
    loss.backward()
    assert loss.item() == pytest.approx(dense_topk_kl(student.detach(), logprobs, indices, mask, "rest", 1.0),
                                        abs=1e-5)
    assert torch.isfinite(student.grad).all()
    # Cached log-probs of -inf (underflow) and a top-k summing a hair above 1 (storage rounding).
    logprobs, indices = teacher_topk(torch.randn(3, 6, V, generator=g))
    logprobs[..., -1] = float("-inf")
    logprobs[..., 0] += 1e-3
    for mode in ("rest", "renormalise"):
        student.grad = None
        loss = topk_kl(student, logprobs, indices, mask, mode=mode)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # A near-saturated student: its leftover mass underflows the top-k sum but not the logsumexp.
    logits = torch.zeros(1, 2, V)
    logits[..., :K] = 40.0
    idx = torch.arange(K).expand(1, 2, K)
    teacher = torch.full((1, 2, K), math.log(0.3))
    loss = topk_kl(logits, teacher, idx, torch.tensor([[True, True]]))
    assert loss.item() == pytest.approx(dense_topk_kl(logits, teacher, idx, torch.tensor([[True, True]]), "rest", 1.0),
                                        rel=1e-4)
    with pytest.raises(ValueError, match="mode"):
        topk_kl(logits, teacher, idx, torch.tensor([[True, True]]), mode="full")


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_relation_loss_by_hand_on_three_tokens():
    # Student rows (unit after normalisation): e1, e1, e2. Teacher: e1, e2, -e1.
    # Centred Grams x9: S = [[2,2,-4],[2,2,-4],[-4,-4,8]] (norm 12),
    # T = [[10,-2,-8],[-2,4,-2],[-8,-2,10]] (norm 6*sqrt(10)), <S,T> = 180,
    # so the loss is 2 - 2*180/(12*6*sqrt(10)) = 2 - sqrt(10)/2.
    student = torch.tensor([[[3.0, 0.0], [0.5, 0.0], [0.0, 2.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 7.0], [-0.1, 0.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert relation_loss(student, teacher, mask).item() == pytest.approx(2 - math.sqrt(10) / 2, rel=1e-6)
    # Without student normalisation the rows' lengths shape the geometry: a different value.
    assert relation_loss(student, teacher, mask, normalise_student=False).item() != pytest.approx(
        2 - math.sqrt(10) / 2, rel=1e-3)


def test_relation_loss_invariances_and_cka_identity():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 5, generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    scales = torch.rand(2, 9, 1, generator=g) * 10 + 0.1
    assert relation_loss(x, x, mask).item() < 1e-6
    assert relation_loss(x * scales, x, mask).item() < 1e-6
    assert relation_loss(unit_rows(x), x * scales, mask, normalise_student=False).item() < 1e-6
    assert relation_loss(x @ rotation, x, mask).item() < 1e-6
    # Widths may differ: an isometric embedding of the teacher in more dimensions.
    wide = torch.cat([x @ rotation, torch.zeros(2, 9, 3)], -1)
    assert relation_loss(x, wide, mask).item() < 1e-6
    y = torch.randn(2, 9, 8, generator=g)
    got = relation_loss(x, y, mask)
    expected = sum(2 * (1 - linear_cka(unit_rows(x[b]), unit_rows(y[b]))) for b in range(2)) / 2
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < got.item() <= 2
    # Two tokens carry no relation: any two distinct centred rows give the same normalised Gram.
    assert relation_loss(x[:, :2], y[:, :2], mask[:, :2]).item() < 1e-6


def test_relation_loss_reads_only_valid_tokens():
    g = torch.Generator().manual_seed(5)
    lengths = [7, 4, 1, 3]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    mask[3, 0] = False  # an unsupervised prompt token inside a sequence
    student = with_garbage(torch.randn(4, 7, 6, generator=g), mask)
    teacher = with_garbage(torch.randn(4, 7, 10, generator=g), mask)
    batched = relation_loss(student, teacher, mask)
    singles = [relation_loss(student[b, mask[b]][None], teacher[b, mask[b]][None], mask[b, mask[b]][None])
               for b in (0, 1, 3)]  # sequence 2 has one token: no geometry, left out of the mean
    assert batched.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-6)


@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_fisher_surrogate_matches_the_matrix_form(shift):
    g, _, _, _, mask = padded_batch(6)
    z = torch.randn(3, 6, V, generator=g, dtype=torch.float64)
    aligned = torch.randn(3, 6, V, generator=g, dtype=torch.float64)
    values = []
    for b, t in mask.nonzero().tolist():
        p = torch.softmax(aligned[b, t], -1)
        d = z[b, t] - aligned[b, t]
        values.append(0.5 * d @ (torch.diag(p) - torch.outer(p, p)) @ d)
    expected = torch.stack(values).mean().item()
    got = fisher_surrogate(with_garbage(z + shift, mask).float(), with_garbage(aligned, mask).float(), mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert fisher_surrogate(aligned.float(), aligned.float(), mask).item() == 0.0


def test_fisher_surrogate_gradient_is_the_fisher_times_the_difference():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(1, 2, V, generator=g, requires_grad=True)
    aligned = torch.randn(1, 2, V, generator=g, requires_grad=True)
    mask = torch.tensor([[True, True]])
    fisher_surrogate(z, aligned, mask).backward()
    for t in range(2):
        p = torch.softmax(aligned[0, t].detach(), -1)
        expected = (torch.diag(p) - torch.outer(p, p)) @ (z[0, t] - aligned[0, t]).detach() / 2
        assert torch.allclose(z.grad[0, t], expected, atol=1e-6)
        # p̃ is a constant: the target side gets only the mirror of d's gradient.
        assert torch.allclose(aligned.grad[0, t], -expected, atol=1e-6)


def test_cosine_losses_match_per_position_loops():
    g, input_ids, _, _, mask = padded_batch(8)
    a, b = torch.randn(3, 6, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    logits = torch.randn(3, 6, V, generator=g)
    cos, label_cos = [], []
    for i, t in mask.nonzero().tolist():
        cos.append(float(a[i, t] @ b[i, t]) / float(a[i, t].norm() * b[i, t].norm()))
        onehot = F.one_hot(input_ids[i, t + 1], V).float()
        label_cos.append(float(logits[i, t] @ onehot) / float(logits[i, t].norm()))
    assert cosine_loss(with_garbage(a, mask), b, mask).item() == pytest.approx(1 - sum(cos) / len(cos), rel=1e-6)
    expected = 1 - sum(label_cos) / len(label_cos)
    assert label_cosine_loss(with_garbage(logits, mask), input_ids, mask).item() == pytest.approx(expected, rel=1e-6)
    targets = input_ids[:, 1:][mask[:, :-1]]
    assert label_cosine_loss(logits[mask], targets).item() == pytest.approx(expected, rel=1e-6)


def kernel_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """The N x N kernel form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with H the centring matrix."""
    x, y = x.double(), y.double()
    h = torch.eye(len(x), dtype=torch.float64) - 1 / len(x)
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l_).sum() / ((k * k).sum() * (l_ * l_).sum()).sqrt())


def test_linear_cka_matches_the_kernel_form_and_is_invariant(monkeypatch):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 6, generator=g) + 3.0
    y = x @ torch.randn(6, 9, generator=g) + 0.5 * torch.randn(40, 9, generator=g)
    value = linear_cka(x, y)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(kernel_cka(x, y), rel=1e-6)
    rotation, _ = torch.linalg.qr(torch.randn(9, 9, generator=g))
    assert linear_cka(x * 7.0, y @ rotation - 4.0).item() == pytest.approx(value.item(), rel=1e-5)
    assert linear_cka(x, x).item() == pytest.approx(1.0, rel=1e-6)
    monkeypatch.setattr(losses, "_CKA_CHUNK_ROWS", 7)  # the chunked accumulation over several chunks
    assert linear_cka(x, y).item() == pytest.approx(value.item(), rel=1e-6)
    assert math.isnan(linear_cka(torch.ones(5, 3), torch.randn(5, 2)).item())
    with pytest.raises(ValueError, match="row-aligned"):
        linear_cka(x, y[:-1])


def every_loss(student, teacher, input_ids, mask, logprobs, indices, aligned):
    """Each loss with the student-side tensor as its differentiable input."""
    return {
        "cross_entropy": lambda: cross_entropy(student, input_ids, mask),
        "topk_kl rest": lambda: topk_kl(student, logprobs, indices, mask, temperature=2.0),
        "topk_kl renormalise": lambda: topk_kl(student, logprobs, indices, mask, mode="renormalise"),
        "relation": lambda: relation_loss(student, teacher, mask),
        "fisher": lambda: fisher_surrogate(student, aligned, mask),
        "cosine": lambda: cosine_loss(student, teacher, mask),
        "label_cosine": lambda: label_cosine_loss(student, input_ids, mask),
    }


def loss_inputs(seed: int):
    g, input_ids, _, _, mask = padded_batch(seed)
    logprobs, indices = teacher_topk(torch.randn(3, 6, V, generator=g))
    student = torch.randn(3, 6, V, generator=g)
    teacher, aligned = torch.randn(3, 6, V, generator=g), torch.randn(3, 6, V, generator=g)
    return student, teacher, input_ids, mask, logprobs, indices, aligned


@pytest.mark.parametrize("name", list(every_loss(*loss_inputs(0))))
def test_gradients_reach_valid_positions_only(name):
    student, *rest = loss_inputs(10)
    mask = rest[2]
    student = with_garbage(student, mask).requires_grad_(True)
    loss = every_loss(student, *rest)[name]()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()
    assert (student.grad[~mask] == 0).all()
    assert (student.grad[mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("name", list(every_loss(*loss_inputs(0))))
def test_an_empty_mask_gives_zero_still_in_the_graph(name):
    student, teacher, input_ids, mask, *rest = loss_inputs(11)
    student.requires_grad_(True)
    loss = every_loss(student, teacher, input_ids, torch.zeros_like(mask), *rest)[name]()
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert (student.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(every_loss(*loss_inputs(0))))
def test_half_precision_inputs_compute_in_float32(name, dtype):
    student, teacher, input_ids, mask, logprobs, indices, aligned = loss_inputs(12)
    low = [t.to(dtype) for t in (student, teacher, logprobs, aligned)]
    reference = every_loss(*[t.float() for t in low[:2]], input_ids, mask, low[2].float(), indices, low[3].float())
    got = every_loss(low[0], low[1], input_ids, mask, low[2], indices, low[3])[name]()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference[name]().item(), rel=1e-6)
