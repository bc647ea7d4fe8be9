"""SemAlign's fixed pieces against independent references: numpy's SVD pseudo-inverse, explicit
V-sized decompose/recompose loops, transformers' own RMSNorm, hand-worked pairings and a brute-force
pairing written from the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pkt_pipeline.methods.semalign.semantic_map import (SemanticMap, attributed_pairing, bases_gram, build_semantic_map,
                                       proportional_pairing, recomposition_fidelity, semantic_bases, semantic_map)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def numpy_bases(head: torch.Tensor, rcond: float = 1e-10) -> np.ndarray:
    """rownorm(pinv(W^T)) through numpy's SVD in float64."""
    pinv = np.linalg.pinv(head.double().numpy().T, rcond=rcond)
    norms = np.linalg.norm(pinv, axis=1, keepdims=True)
    return pinv / np.where(norms > 0, norms, 1)


def head_dict(lm_head: torch.Tensor, gain: torch.Tensor | None = None) -> dict:
    gain = torch.ones(lm_head.shape[1]) if gain is None else gain
    return {"lm_head": lm_head.bfloat16(), "final_norm": gain.bfloat16(), "norm_eps": 1e-6}


# --- bases -------------------------------------------------------------------------------------------

def test_bases_by_hand_including_a_zero_row():
    # W^T = [[2, 0, 0], [0, 3, 0]] -> pinv = [[1/2, 0], [0, 1/3], [0, 0]]: rows e1, e2 and a zero row.
    bases = semantic_bases(torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]))
    torch.testing.assert_close(bases, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    # Square: pinv(W^T) = W^-T = [[1, -1], [0, 1]].
    bases = semantic_bases(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(bases, torch.tensor([[1 / math.sqrt(2), -1 / math.sqrt(2)], [0.0, 1.0]]))


def test_bases_match_numpy_pinv_and_invert_the_head():
    head = randn(200, 16)
    bases = semantic_bases(head)
    assert bases.dtype == torch.float32 and bases.shape == (200, 16)
    torch.testing.assert_close(bases.norm(dim=1), torch.ones(200))
    pinv = np.linalg.pinv(head.double().numpy().T)
    np.testing.assert_allclose(head.double().numpy().T @ pinv, np.eye(16), atol=1e-10)
    np.testing.assert_allclose(bases.numpy(), numpy_bases(head), atol=2e-6)
    # bf16 heads are read as they are (upcast), not first rounded elsewhere.
    np.testing.assert_allclose(semantic_bases(head.bfloat16()).numpy(), numpy_bases(head.bfloat16().float()), atol=2e-6)


def test_bases_keep_ill_conditioned_directions_and_drop_null_ones():
    q_left, _ = torch.linalg.qr(randn(12000, 8, seed=1).double())
    q_right, _ = torch.linalg.qr(randn(8, 8, seed=2).double())
    # sigma_min / sigma_max = 1e-3 (real heads sit near 1/65): all of it must survive, where
    # torch.linalg.pinv's default max(V, D) * eps = 1.4e-3 would drop the last direction.
    spread = (q_left * torch.logspace(0, -3, 8, dtype=torch.float64)) @ q_right.T
    np.testing.assert_allclose(semantic_bases(spread.float()).numpy(), numpy_bases(spread.float()), atol=1e-4)
    # A duplicated column makes W rank-deficient: the null direction must be dropped, as numpy does.
    deficient = randn(300, 8, seed=3)
    deficient[:, 7] = deficient[:, 0]
    bases = semantic_bases(deficient)
    assert torch.isfinite(bases).all()
    np.testing.assert_allclose(bases.numpy(), numpy_bases(deficient, rcond=1e-6), atol=1e-5)


def test_bases_refuse_a_non_matrix():
    with pytest.raises(ValueError, match=r"\[V, D\].*\(3,\)"):
        semantic_bases(torch.ones(3))


# --- the map -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_equal_to_student(seed):
    head = randn(240, 12, seed=seed)
    lstsq = semantic_map(head, head, 240, recompose="lstsq")
    torch.testing.assert_close(lstsq, torch.eye(12), atol=1e-4, rtol=0)
    torch.testing.assert_close(lstsq / lstsq[0, 0], torch.eye(12), atol=1e-4, rtol=0)
    transpose = semantic_map(head, head, 240)
    bases = torch.from_numpy(numpy_bases(head))
    torch.testing.assert_close(transpose.double(), bases.T @ bases, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(transpose, transpose.T)
    assert torch.linalg.eigvalsh(transpose.double()).min() > -1e-6
    # Overcomplete: B^T B is far from a multiple of the identity (the reviewer objection).
    scaled = transpose / transpose.diagonal().mean()
    assert (scaled - torch.eye(12)).abs().max() > 0.05

    mapped = build_semantic_map(head_dict(head), head.bfloat16().float(), 240)
    h = randn(5, 12, seed=seed + 10)
    cosine = F.cosine_similarity(h, mapped.apply(h), dim=-1)
    torch.testing.assert_close(cosine, recomposition_fidelity(semantic_bases(head.bfloat16()), h), atol=1e-5, rtol=0)


def test_map_between_different_heads_matches_numpy():
    teacher, student = randn(150, 10, seed=4), randn(150, 6, seed=5)
    b_t, b_s = numpy_bases(teacher), numpy_bases(student)
    transpose = semantic_map(teacher, student, 150)
    assert transpose.shape == (6, 10) and transpose.dtype == torch.float32
    np.testing.assert_allclose(transpose.numpy(), b_s.T @ b_t, atol=1e-4, rtol=1e-5)
    lstsq = semantic_map(teacher, student, 150, recompose="lstsq")
    np.testing.assert_allclose(lstsq.numpy(), np.linalg.pinv(b_s) @ b_t, atol=1e-4, rtol=1e-4)


def test_apply_matches_explicit_decompose_recompose():
    teacher, student = randn(90, 8, seed=6), randn(90, 5, seed=7)
    mapped = build_semantic_map(head_dict(teacher), student, 90)
    b_t, b_s = numpy_bases(teacher.bfloat16().float()), numpy_bases(student)
    h = randn(2, 3, 8, seed=8)
    expected = np.empty((2, 3, 5))
    for i in range(2):
        for t in range(3):
            vector = h[i, t].double().numpy()
            a = b_t @ (vector / np.linalg.norm(vector))
            expected[i, t] = b_s.T @ a
    out = mapped.apply(h)
    assert out.shape == (2, 3, 5) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4, rtol=1e-4)


def test_apply_is_invariant_to_per_token_scale_and_keeps_zero_vectors_zero():
    mapped = build_semantic_map(head_dict(randn(80, 8, seed=9)), randn(80, 4, seed=10), 80)
    h = randn(3, 6, 8, seed=11)
    scale = torch.rand(3, 6, 1, generator=torch.Generator().manual_seed(12)) * 100 + 1e-3
    torch.testing.assert_close(mapped.apply(h * scale), mapped.apply(h), atol=1e-5, rtol=1e-5)
    assert torch.equal(mapped.apply(h.bfloat16()), mapped.apply(h.bfloat16().float()))
    h[1, 2] = 0
    out = mapped.apply(h)
    assert torch.isfinite(out).all() and torch.equal(out[1, 2], torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\].*\(3, 7\)"):
        mapped.apply(torch.ones(3, 7))


def test_post_norm_multiplies_by_the_gain_and_equals_mapping_the_rmsnormed_state():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    teacher, student = randn(80, 8, seed=13), randn(80, 4, seed=14)
    gain = (torch.rand(8, generator=torch.Generator().manual_seed(15)) * 3 + 0.1).bfloat16().float()
    post = build_semantic_map(head_dict(teacher, gain), student, 80, map_space="post_norm")
    residual = build_semantic_map(head_dict(teacher, gain), student, 80)
    assert residual.teacher_norm is None and torch.equal(post.teacher_norm, gain)
    h = randn(4, 8, seed=16) * 7
    torch.testing.assert_close(post.apply(h), residual.apply(h * gain))
    norm = Qwen2RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(gain)
        torch.testing.assert_close(post.apply(h), residual.apply(norm(h)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(post.apply(h), residual.apply(h), atol=1e-3)


def test_padding_rows_beyond_the_vocabulary_are_ignored():
    teacher, student = randn(60, 8, seed=17), randn(60, 4, seed=18)
    padded_teacher = torch.cat([teacher, 1e3 * randn(4, 8, seed=19)])
    padded_student = torch.cat([student, randn(9, 4, seed=20)])
    for recompose in ("transpose", "lstsq"):
        torch.testing.assert_close(semantic_map(padded_teacher, padded_student, 60, recompose),
                                   semantic_map(teacher, student, 60, recompose))
    with pytest.raises(ValueError, match=r"vocab_size 65.*teacher \(64, 8\).*student \(69, 4\)"):
        semantic_map(padded_teacher, padded_student, 65)


def test_bad_options_are_refused():
    head = randn(20, 4)
    with pytest.raises(ValueError, match="recompose.*'svd'"):
        semantic_map(head, head, 20, recompose="svd")
    with pytest.raises(ValueError, match="map_space.*'logits'"):
        build_semantic_map(head_dict(head), head, 20, map_space="logits")
    with pytest.raises(ValueError, match="final-norm gain has shape \\(3,\\), expected \\(4,\\)"):
        build_semantic_map(head_dict(head, torch.ones(3)), head, 20, map_space="post_norm")


def test_map_between_the_tiny_models(tiny_pair):
    from transformers import AutoModelForCausalLM

    from pkt_pipeline.extraction import final_norm_and_head

    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    gain, head, eps = final_norm_and_head(teacher)
    vocab = teacher.config.vocab_size
    mapped = build_semantic_map({"lm_head": head.bfloat16(), "final_norm": gain.bfloat16(), "norm_eps": eps},
                                student.get_output_embeddings().weight, vocab, map_space="post_norm")
    assert isinstance(mapped, SemanticMap)
    assert mapped.matrix.shape == (32, 64) and mapped.vocab_size == vocab
    assert not mapped.matrix.requires_grad
    out = mapped.apply(randn(2, 3, 64))
    assert out.shape == (2, 3, 32) and torch.isfinite(out).all()
    own = student.get_output_embeddings().weight.detach()
    self_map = build_semantic_map(head_dict(own), own.bfloat16().float(), vocab, recompose="lstsq")
    torch.testing.assert_close(self_map.matrix, torch.eye(32), atol=1e-4, rtol=0)


# --- pairing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher_layers, student_layers, expected", [
    (4, 2, [2, 4]),
    (7, 3, [2, 4, 7]),
    (5, 5, [1, 2, 3, 4, 5]),
    (2, 4, [1, 1, 1, 2]),
    (1, 3, [1, 1, 1]),
    (28, 24, [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24, 25, 26, 28]),
])
def test_proportional_pairing_by_hand(teacher_layers, student_layers, expected):
    assert proportional_pairing(teacher_layers, student_layers) == expected


def test_attributed_pairing_picks_the_peak_inside_the_window():
    scores = np.zeros(13)
    scores[4], scores[10], scores[0] = 5.0, 9.0, 100.0  # layer 0 is never a candidate
    # Proportional [3, 6, 9, 12]; windows [2, 4], [5, 7], [8, 10], [11, 12] (>= the previous pick).
    assert attributed_pairing(scores, 4, window=1) == [4, 6, 10, 12]
    assert attributed_pairing(scores, 4, window=3) == [4, 4, 10, 10]
    # Ties: the proportional layer when it is among the best, else the shallower.
    assert attributed_pairing(np.ones(13), 4, window=2) == [3, 6, 9, 12]
    scores = np.zeros(13)
    scores[[5, 7]] = 1.0
    assert attributed_pairing(scores, 4, window=1)[1] == 5


def test_contribution_scores_spread_a_pairing_that_output_scores_pin_to_the_window_edge():
    """A hand profile of a residual stream: each layer adds about as much (peaks at 3, 6, 10, 12), so the
    stream's own score grows with depth. Ranked by output, every window's deep edge wins; ranked by
    contribution, the peaks are found."""
    contribution = np.array([1.0, 1, 1, 3, 1, 1, 3, 1, 1, 1, 3, 1, 3])
    output = np.cumsum(contribution)
    assert attributed_pairing(output, 4, window=2) == [5, 8, 11, 12]
    assert attributed_pairing(contribution, 4, window=2) == [3, 6, 10, 12]


def test_distinct_pairing_gives_each_student_layer_its_own_teacher_layer():
    """The MMLU cache's contribution profile (Qwen2.5-Coder-1.5B, 16 examples) falls over the first
    layers: non-decreasing picks pile onto layer 1; distinct ones skip the least-contributing layers."""
    contribution = np.array([0.933, 1.0, 0.76, 0.753, 0.62, 0.643, 0.533, 0.533, 0.53, 0.516, 0.481, 0.482, 0.528,
                             0.471, 0.481, 0.433, 0.46, 0.465, 0.49, 0.533, 0.569, 0.514, 0.56, 0.542, 0.521, 0.503,
                             0.486, 0.734, 0.891])
    assert attributed_pairing(contribution, 24, window=2)[:4] == [1, 1, 1, 2]
    assert attributed_pairing(contribution, 24, window=2, distinct=True) == [
        1, 2, 3, 5, 6, 7, 8, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28]
    rng = np.random.default_rng(1)
    for _ in range(300):
        student_layers = int(rng.integers(1, 30))
        teacher_layers = student_layers + int(rng.integers(0, 20))
        window = int(rng.integers(0, 5))
        pairs = attributed_pairing(rng.random(teacher_layers + 1), student_layers, window, distinct=True)
        proportional = proportional_pairing(teacher_layers, student_layers)
        assert all(a < b for a, b in zip(pairs, pairs[1:])) and 1 <= pairs[0] and pairs[-1] <= teacher_layers
        assert all(abs(p - base) <= window for p, base in zip(pairs, proportional))
    with pytest.raises(ValueError, match="distinct pairing needs a teacher at least as deep as the student"):
        attributed_pairing(np.ones(5), 6, distinct=True)


def reference_pairing(scores: np.ndarray, student_layers: int, window: int) -> list[int]:
    """The attributed rule from its definition, written as a filter + stable sort."""
    teacher_layers = len(scores) - 1
    pairs = []
    for k in range(1, student_layers + 1):
        base = max(1, math.floor(teacher_layers * k / student_layers))
        floor = pairs[-1] if pairs else 1
        candidates = [layer for layer in range(1, teacher_layers + 1)
                      if abs(layer - base) <= window and layer >= floor]
        candidates.sort()
        candidates.sort(key=lambda layer: layer != base)
        candidates.sort(key=lambda layer: scores[layer], reverse=True)
        pairs.append(candidates[0])
    return pairs


def test_attributed_pairing_on_random_scores():
    rng = np.random.default_rng(0)
    for _ in range(300):
        teacher_layers, student_layers = int(rng.integers(1, 40)), int(rng.integers(1, 30))
        window = int(rng.integers(0, 5))
        scores = rng.random(teacher_layers + 1)
        if rng.random() < 0.3:
            scores = np.round(scores * 3)  # plenty of ties
        pairs = attributed_pairing(scores, student_layers, window)
        assert pairs == reference_pairing(scores, student_layers, window)
        assert len(pairs) == student_layers and all(1 <= p <= teacher_layers for p in pairs)
        assert all(a <= b for a, b in zip(pairs, pairs[1:]))
        proportional = proportional_pairing(teacher_layers, student_layers)
        assert attributed_pairing(scores, student_layers, window=0) == proportional


def test_critical_layers_by_hand():
    scores = np.zeros(13)
    scores[1] = 9.0  # outside the first window [2, 4]
    assert attributed_pairing(scores, 4, window=1) == [3, 6, 9, 12]
    assert attributed_pairing(scores, 4, window=1, critical=1) == [1, 6, 9, 12]
    # Deeper than every pick: layer 9 goes last, and the critical 8 shifts to student layer 1.
    scores = np.zeros(11)
    scores[8], scores[9] = 5.0, 4.0
    assert attributed_pairing(scores, 2, window=2) == [5, 8]
    assert attributed_pairing(scores, 2, window=2, critical=2) == [8, 9]


def test_critical_layers_are_all_hit_on_random_scores():
    rng = np.random.default_rng(1)
    for _ in range(300):
        teacher_layers, student_layers = int(rng.integers(1, 40)), int(rng.integers(1, 30))
        window = int(rng.integers(0, 5))
        critical = int(rng.integers(0, min(teacher_layers, student_layers) + 1))
        scores = rng.random(teacher_layers + 1)
        pairs = attributed_pairing(scores, student_layers, window, critical)
        top = np.argsort(-scores[1:], kind="stable")[:critical] + 1
        assert set(top.tolist()) <= set(pairs)
        assert len(pairs) == student_layers and all(1 <= p <= teacher_layers for p in pairs)
        assert all(a <= b for a, b in zip(pairs, pairs[1:]))
        if critical == 0:
            assert pairs == attributed_pairing(scores, student_layers, window)


@pytest.mark.parametrize("call, message", [
    (lambda: attributed_pairing(np.ones((2, 3)), 2), r"1-D over teacher layers 0\.\.L_T.*\(2, 3\)"),
    (lambda: attributed_pairing(np.ones(1), 2), r"length >= 2.*\(1,\)"),
    (lambda: attributed_pairing([1.0, float("nan"), 2.0], 2), "finite"),
    (lambda: attributed_pairing(np.ones(5), 0), "student_layers must be >= 1, got 0"),
    (lambda: attributed_pairing(np.ones(5), 2, window=-1), "window must be >= 0, got -1"),
    (lambda: attributed_pairing(np.ones(5), 2, critical=3), r"0\.\.min\(L_T, L_S\) = 0\.\.2, got 3"),
    (lambda: proportional_pairing(0, 2), "at least 1 layer, got L_T = 0"),
    (lambda: proportional_pairing(4, 0), "student_layers must be >= 1, got 0"),
])
def test_bad_pairing_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- fidelity ----------------------------------------------------------------------------------------

def test_fidelity_is_one_for_an_orthogonal_head_and_below_one_when_overcomplete():
    orthogonal, _ = torch.linalg.qr(randn(16, 16, seed=21))
    h = randn(10, 16, seed=22)
    torch.testing.assert_close(recomposition_fidelity(semantic_bases(orthogonal), h), torch.ones(10))
    fidelity = recomposition_fidelity(semantic_bases(randn(200, 16, seed=23)), h)
    assert (fidelity < 0.999).all() and (fidelity > 0).all()


def test_fidelity_matches_a_direct_per_row_computation():
    bases = semantic_bases(randn(120, 8, seed=24))
    h = randn(6, 8, seed=25)
    h[2] *= 1e4
    direct = []
    for row in h.double():
        a = bases.double() @ (row / row.norm())
        recomposed = bases.double().T @ a
        direct.append(float(row @ recomposed / (row.norm() * recomposed.norm())))
    fidelity = recomposition_fidelity(bases, h)
    torch.testing.assert_close(fidelity.double(), torch.tensor(direct, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(recomposition_fidelity(bases, h, gram=bases_gram(bases)), fidelity)
    with pytest.raises(ValueError, match=r"\[N, 8\].*\(6, 7\)"):
        recomposition_fidelity(bases, h[:, :7])
