"""The stage-two training losses (METHOD.md sections 1.2-1.4 and 2), as pure torch functions.

Conventions shared by every loss:
- batch-first padded tensors; `mask` is a bool [B, T] of the positions that count;
- logit-level losses take the next-token mask of `next_token_mask`: logits at t predict token t+1;
- inputs may be bf16/fp16; the arithmetic is float32 and the result a float32 scalar;
- masked rows are selected (or zeroed with `where`) before any arithmetic, so padding holding
  garbage, even inf/nan, changes neither the value nor the gradient (it gets exactly zero);
- a batch with no valid position gives 0, still attached to the graph so `backward()` works.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

KLMode = Literal["rest", "renormalise"]
KL_MODES: tuple[str, ...] = get_args(KLMode)
_TINY = torch.finfo(torch.float32).tiny
_CKA_CHUNK_ROWS = 8192


def next_token_mask(supervised: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at t when token t+1 is a real, supervised token (and t itself is real).

    `supervised` marks answer tokens (like HF `labels != -100`); any dtype, nonzero = True. The last
    position never has a next token, so it is always False."""
    if supervised.shape != attention_mask.shape or supervised.dim() != 2:
        raise ValueError(f"supervised {tuple(supervised.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be [B, T]")
    real = attention_mask.bool()
    mask = torch.zeros_like(real)
    mask[:, :-1] = supervised[:, 1:].bool() & real[:, 1:] & real[:, :-1]
    return mask


def cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over masked positions of -log softmax(logits[t])[input_ids[t+1]].

    With `mask` (from `next_token_mask`): logits [B, T, V], input_ids [B, T]. Without it the logits are
    already taken at the predicting positions, [N, V], and `input_ids` are their [N] target ids (the
    `StudentOutputs.logits/targets` of `methods.base.forward_student`)."""
    rows, targets = _next_token_rows(logits, input_ids, mask)
    picked = rows.gather(-1, targets[:, None])[:, 0]
    return (torch.logsumexp(rows, -1) - picked).sum() / max(len(rows), 1)


def topk_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
            mask: torch.Tensor, mode: str = "rest", temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student) averaged over masked positions, from the teacher's cached top-k.

    The teacher is only known on its k cached tokens, so the full-vocabulary KL is out of reach; two
    finite-support views of it:
    - `rest` (default): k+1 categories, the k cached tokens plus one bucket with the remaining mass,
      1 - sum(p_top-k) for the teacher and 1 - sum(q[top-k]) for the student. The student's bucket is
      computed exactly as a logsumexp over the other V-k logits, so it stays accurate when tiny.
      The student is thus also pushed to leave the teacher's leftover mass outside the top-k.
    - `renormalise`: teacher and student both renormalised over the teacher's k tokens; only the
      relative odds among them are matched (the student's mass elsewhere is free).
    Temperature T divides the student logits. The cache holds teacher log-probs at T=1 over k tokens,
    so for T != 1 the teacher is re-tempered as log_softmax(teacher_logprobs / T) over the k: its rest
    bucket is then empty, since the shape of the tail is unknown. The loss is scaled by T^2 (Hinton)
    so gradient magnitudes stay comparable across temperatures. Shapes: [B, T, V], [B, T, k] x2, [B, T].
    """
    if mode not in KL_MODES:
        raise ValueError(f"topk_kl mode {mode!r} is not one of {KL_MODES}")
    if not temperature > 0:
        raise ValueError(f"topk_kl temperature must be > 0, got {temperature}")
    _check_mask(mask, student_logits, "student_logits")
    if teacher_logprobs.shape != teacher_indices.shape or teacher_logprobs.shape[:2] != mask.shape:
        raise ValueError(f"teacher_logprobs {tuple(teacher_logprobs.shape)} and teacher_indices "
                         f"{tuple(teacher_indices.shape)} must both be [B, T, k] with [B, T] = {tuple(mask.shape)}")
    student = student_logits[mask].float() / temperature
    teacher = teacher_logprobs[mask].float()
    indices = teacher_indices[mask].long()
    if temperature != 1.0 or mode == "renormalise":
        teacher = torch.log_softmax(teacher / temperature, -1)
    p = teacher.exp()
    if mode == "renormalise":
        log_q = torch.log_softmax(student.gather(-1, indices), -1)
        kl = (torch.xlogy(p, p) - p * log_q).sum(-1)
    else:
        log_z = torch.logsumexp(student, -1, keepdim=True)
        log_q = student.gather(-1, indices) - log_z
        # A finite fill, not -inf: with k == V the tail is empty and -inf would make the backward NaN.
        tail = student.scatter(-1, indices, torch.finfo(torch.float32).min)
        log_q_rest = (torch.logsumexp(tail, -1) - log_z[:, 0]).clamp_min(math.log(_TINY))
        p_rest = (-torch.expm1(torch.logsumexp(teacher, -1))).clamp_min(0.0)
        kl = (torch.xlogy(p, p) - p * log_q).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest
    return kl.sum() * temperature**2 / max(len(kl), 1)


def relation_loss(student: torch.Tensor, teacher_mapped: torch.Tensor, mask: torch.Tensor,
                  normalise_student: bool = True) -> torch.Tensor:
    """SemAlign v2 relation-geometry loss ||Ĝ(X_S) - Ĝ(X_T)||_F^2, mean over sequences (METHOD 1.4).

    Per sequence, over its masked tokens only: rows normalised to unit length (the teacher's always,
    since the semantic map has arbitrary scale; the student's when `normalise_student`), centred over
    the sequence's valid tokens (C = I - 11^T/T), G = Xc Xc^T, Ĝ = G/||G||_F. The Gram is token x token,
    so the widths of `student` [B, T, Ds] and `teacher_mapped` [B, T, Ds'] may differ.
    Equivalently 2 (1 - linear CKA) of the same normalised rows (<G_S, G_T>_F = ||Xt_c^T Xs_c||_F^2):
    0 for identical geometry, 2 at most. Sequences with fewer than 2 valid tokens have no geometry and
    are left out of the mean; a 2-token one counts but adds 0 with no gradient, since any two distinct
    centred rows give the same Ĝ."""
    _check_mask(mask, student, "student")
    _check_mask(mask, teacher_mapped, "teacher_mapped")
    keep = mask[..., None]
    counts = mask.sum(1)

    def unit_gram(x: torch.Tensor, normalise: bool) -> torch.Tensor:
        x = torch.where(keep, x.float(), 0.0)
        if normalise:
            x = F.normalize(x, dim=-1)
        mean = x.sum(1, keepdim=True) / counts.clamp_min(1)[:, None, None]
        x = torch.where(keep, x - mean, 0.0)
        gram = x @ x.transpose(1, 2)
        return gram / torch.linalg.matrix_norm(gram)[:, None, None].clamp_min(_TINY)

    per_sequence = (unit_gram(student, normalise_student) - unit_gram(teacher_mapped, True)).square().sum((1, 2))
    valid = counts >= 2
    return torch.where(valid, per_sequence, 0.0).sum() / valid.sum().clamp_min(1)


def fisher_surrogate(student_logits: torch.Tensor, aligned_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """½ (z - z̃)^T (diag(p̃) - p̃p̃^T)(z - z̃), p̃ = softmax(z̃), mean over masked positions.

    The second-order expansion of KL(p̃ || softmax(z)) around z = z̃ (the softmax Fisher metric), with
    p̃ a constant. It equals ½ Var_p̃(d) for d = z - z̃, computed as the centred ½ Σ p̃ (d - Σ p̃ d)^2,
    the same value as ½[Σ p̃ d² - (Σ p̃ d)²] without its cancellation; adding a constant to z changes
    nothing, like the softmax. Shapes: [B, T, V] x2, [B, T]."""
    _check_mask(mask, student_logits, "student_logits")
    if aligned_logits.shape != student_logits.shape:
        raise ValueError(f"aligned_logits {tuple(aligned_logits.shape)} must match student_logits "
                         f"{tuple(student_logits.shape)}")
    aligned = aligned_logits[mask].float()
    p = torch.softmax(aligned, -1).detach()
    d = student_logits[mask].float() - aligned
    centred = d - (p * d).sum(-1, keepdim=True)
    return 0.5 * (p * centred.square()).sum() / max(len(d), 1)


def cosine_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - mean cos(a[t], b[t]) over masked positions (SemAlign v1 layer term); [B, T, D] x2, [B, T]."""
    _check_mask(mask, a, "a")
    _check_mask(mask, b, "b")
    cos = F.cosine_similarity(a[mask].float(), b[mask].float(), dim=-1)
    return (1 - cos).sum() / max(len(cos), 1)


def label_cosine_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - mean cos(logits[t], onehot(token t+1)) over masked positions (SemAlign v1 output term).

    The cosine with a one-hot is z[label] / ||z||, so the one-hot is never built. Same two input forms
    as `cross_entropy`: [B, T, V], [B, T] with `mask`, or already gathered [N, V], [N] without."""
    rows, targets = _next_token_rows(logits, input_ids, mask)
    cos = rows.gather(-1, targets[:, None])[:, 0] / torch.linalg.vector_norm(rows, dim=-1).clamp_min(1e-8)
    return (1 - cos).sum() / max(len(cos), 1)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of row-aligned x [N, D1] and y [N, D2]: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F).

    Columns are centred over the N rows. Float64 inside, since the three Frobenius norms are of
    fourth-order sums; rows are upcast a chunk at a time so a diagnostics run over many tokens does
    not hold a float64 copy of both matrices. NaN when x or y is constant (CKA is 0/0 there)."""
    if x.dim() != 2 or y.dim() != 2 or len(x) != len(y):
        raise ValueError(f"linear_cka needs row-aligned [N, D1] and [N, D2], got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 2:
        raise ValueError(f"linear_cka needs at least 2 rows, got {len(x)}")
    mean_x, mean_y = _chunked_mean(x), _chunked_mean(y)
    xx = x.new_zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    yy = y.new_zeros(y.shape[1], y.shape[1], dtype=torch.float64)
    yx = x.new_zeros(y.shape[1], x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), _CKA_CHUNK_ROWS):
        xc = x[start:start + _CKA_CHUNK_ROWS].double() - mean_x
        yc = y[start:start + _CKA_CHUNK_ROWS].double() - mean_y
        xx = xx + xc.T @ xc
        yy = yy + yc.T @ yc
        yx = yx + yc.T @ xc
    return (yx.square().sum() / (torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy))).float()


def _chunked_mean(x: torch.Tensor) -> torch.Tensor:
    total = sum(x[start:start + _CKA_CHUNK_ROWS].double().sum(0) for start in range(0, len(x), _CKA_CHUNK_ROWS))
    return total / len(x)


def _check_mask(mask: torch.Tensor, x: torch.Tensor, name: str) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (an integer mask would index, not select), got {mask.dtype}")
    if mask.dim() != 2 or x.shape[:2] != mask.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must be [B, T] matching the first two dims of {name} "
                         f"{tuple(x.shape)}")


def _next_token_rows(logits: torch.Tensor, input_ids: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits [N, V] at the predicting positions, their [N] next-token ids)."""
    if mask is None:
        if logits.dim() != 2 or input_ids.shape != logits.shape[:1]:
            raise ValueError(f"without a mask, logits must be [N, V] and targets [N], got {tuple(logits.shape)} "
                             f"and {tuple(input_ids.shape)}")
        return logits.float(), input_ids.long()
    _check_mask(mask, logits, "logits")
    if input_ids.shape != mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} must be [B, T] = {tuple(mask.shape)}")
    if mask[:, -1].any():
        raise ValueError("mask is True at the last position, which has no next token: build it with next_token_mask")
    return logits[mask].float(), input_ids[:, 1:][mask[:, :-1]].long()


def sorted_probability_distance(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """ULD's Wasserstein-1 between two next-token distributions over different vocabularies, mean over rows.

    student_logits [N, V_S]; teacher_logprobs [N, k] (the cache's top-k). Without a shared vocabulary the
    distributions are compared as sorted probability vectors (Boizard et al. 2024): the teacher's k largest
    probabilities against the student's k largest (zeros pad a student vocabulary smaller than k), summed
    |p_T(i) - p_S(i)| over ranks i. Rows beyond the cached top-k carry no teacher mass and are not compared."""
    k = teacher_logprobs.shape[-1]
    student = torch.softmax(student_logits.float(), dim=-1)
    student = student.topk(min(k, student.shape[-1]), dim=-1).values
    student = F.pad(student, (0, k - student.shape[-1]))
    teacher = teacher_logprobs.float().exp().sort(dim=-1, descending=True).values
    return (teacher - student).abs().sum(-1).sum() / max(len(teacher), 1)


BinaryDivergence = Literal["binary_ce", "binary_kl"]
BINARY_DIVERGENCES: tuple[str, ...] = get_args(BinaryDivergence)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (log1p near -inf, expm1 near 0)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def binarised_likelihood_divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, temperature: float = 1.0,
                                    divergence: str = "binary_ce", epsilon: float = 1e-6) -> torch.Tensor:
    """ALM's chunk term (Minixhofer et al. 2025), mean over chunks: each chunk's likelihood under each model as a
    Bernoulli {p, 1 - p} and a divergence between the two, so text whose tokens differ is compared by what both
    models say about the same characters.

    student_logp, teacher_logp [C]: the chunks' log-likelihoods (sums of token log-probs, <= 0). They are
    scaled by 1/`temperature` (p^(1/T): long chunks' tiny likelihoods are lifted away from 0) and moved
    `epsilon` below 0 so that log(1 - p) stays finite. `binary_ce` (the authors' default):
    -(p_T log p_S + (1 - p_T) log(1 - p_S)); `binary_kl`: the same minus the teacher's binary entropy, the
    f-divergence KL itself (0 when the two agree; the same gradient)."""
    if divergence not in BINARY_DIVERGENCES:
        raise ValueError(f"divergence must be one of {BINARY_DIVERGENCES}, got {divergence!r}")
    if student_logp.shape != teacher_logp.shape or student_logp.dim() != 1:
        raise ValueError(f"student_logp {tuple(student_logp.shape)} and teacher_logp {tuple(teacher_logp.shape)} "
                         "must both be [C]")
    student = student_logp.float().clamp(max=0) / temperature - epsilon
    teacher = teacher_logp.float().clamp(max=0) / temperature - epsilon
    p_teacher = teacher.exp()
    terms = -(p_teacher * student + (1 - p_teacher) * log1mexp(student))
    if divergence == "binary_kl":
        terms = terms + p_teacher * teacher + (1 - p_teacher) * log1mexp(teacher)
    return terms.sum() / max(len(terms), 1)
