"""SemAlign's fixed pieces (METHOD.md 1.1-1.3): semantic bases, the teacher->student map, layer
pairing and the map diagnostics, from LM-head weights and cached attribution scores alone.

Bases B = rownorm(pinv(W_U^T)): row v is the latent direction the LM head reads as token v. A teacher
state is decomposed into a = B_T h/|h| (its cosine with every teacher basis) and recomposed in the
student's space; both steps are linear, so the whole map is one fixed matrix M [D_S, D_T], built
once from a V-sized contraction and applied to unit-normalised teacher vectors.

Recomposition, `recompose=`:
- "transpose" (the paper): h~ = B_S^T a, M = B_S^T B_T.
- "lstsq": h~ = argmin_x |B_S x - a|, M = pinv(B_S) B_T: the student vector whose own decomposition
  best matches a. Because B is overcomplete (V >> D), B^T B is not a multiple of the identity, so
  with teacher = student "transpose" distorts a state by B^T B (the reviewer objection in METHOD.md)
  while "lstsq" returns it exactly (M = I).

The pseudo-inverses go through the D x D Gram in float64 (eigh), never an SVD of the V x D head: the
Gram squares the condition number, which float64 absorbs, and it costs two V*D^2 products instead of
a V x D SVD (V = 151936, D = 1536 on 2 shared CPU cores: 30-45 s and 3.2 GB peak, against 110-125 s
and 4.6 GB for torch.linalg.pinv).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from .config import MapSpace, Recompose

RECOMPOSE: tuple[str, ...] = get_args(Recompose)
MAP_SPACES: tuple[str, ...] = get_args(MapSpace)
_CHUNK_ROWS = 16384
_EPS32 = torch.finfo(torch.float32).eps


def semantic_bases(lm_head: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """[V, D] float32: rows of pinv(W_U^T), each scaled to unit length (zero rows stay zero).

    pinv(W^T) = W (W^T W)^+, with the Gram pseudo-inverted in float64. Singular values of W below
    `rtol * sigma_max` count as zero; the default D * eps(float32) sits above the float32 rounding
    noise of a head (at most ~sqrt(D) * eps * sigma_max) and far below the real spectra: the Qwen2.5
    heads have sigma_min / sigma_max ~ 1/65. torch.linalg.pinv's default max(V, D) * eps (~0.018 for
    V = 151936) would silently drop 2-3 of those heads' genuine directions.
    """
    if lm_head.dim() != 2:
        raise ValueError(f"an LM head is [V, D], got shape {tuple(lm_head.shape)}")
    weight = lm_head.detach().float()
    if rtol is None:
        rtol = weight.shape[1] * _EPS32
    inverse = _pinv_psd(_gram(weight, weight), rtol)
    bases = torch.empty_like(weight)
    for start in range(0, len(weight), _CHUNK_ROWS):
        # float64: in float32 the product alone would cost ~eps * cond(W) of accuracy.
        rows = weight[start:start + _CHUNK_ROWS].double() @ inverse
        bases[start:start + _CHUNK_ROWS] = F.normalize(rows, dim=-1)
    return bases


def semantic_map(teacher_head: torch.Tensor, student_head: torch.Tensor, vocab_size: int,
                 recompose: str = "transpose") -> torch.Tensor:
    """M [D_S, D_T] float32 from the first `vocab_size` rows of each head (rows past the shared
    vocabulary are padding, and the two models may pad differently). Computed on the student head's
    device, where the map is used."""
    if recompose not in RECOMPOSE:
        raise ValueError(f"recompose must be one of {RECOMPOSE}, got {recompose!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for name, head in (("teacher", teacher_head), ("student", student_head)):
        if head.dim() != 2:
            raise ValueError(f"the {name} LM head must be [V, D], got shape {tuple(head.shape)}")
    if len(teacher_head) < vocab_size or len(student_head) < vocab_size:
        raise ValueError(f"vocab_size {vocab_size} exceeds an LM head: teacher {tuple(teacher_head.shape)}, "
                         f"student {tuple(student_head.shape)}")
    device = student_head.device
    student = semantic_bases(student_head[:vocab_size])
    teacher = semantic_bases(teacher_head[:vocab_size].to(device))
    matrix = _gram(student, teacher)
    if recompose == "lstsq":
        # pinv(B_S) = (B_S^T B_S)^+ B_S^T, so only a D_S x D_S inverse is needed.
        matrix = _pinv_psd(_gram(student, student), student.shape[1] * _EPS32) @ matrix
    return matrix.float()


@dataclass(frozen=True, eq=False)
class SemanticMap:
    """The fixed teacher->student map. Its scale is arbitrary: every loss that uses it must be
    scale-invariant."""

    matrix: torch.Tensor
    """M [D_S, D_T] float32."""
    recompose: str
    vocab_size: int
    map_space: str
    teacher_norm: torch.Tensor | None
    """The teacher's final-norm gain [D_T] when map_space is "post_norm", else None."""

    def apply(self, h_teacher: torch.Tensor) -> torch.Tensor:
        """[..., D_T] -> [..., D_S] float32: each token vector unit-normalised, then multiplied by M^T.

        "post_norm" multiplies by the final-norm gain first. That is all of RMSNorm that matters: its
        per-token 1/rms cancels under the unit normalisation (up to its epsilon)."""
        if h_teacher.shape[-1] != self.matrix.shape[1]:
            raise ValueError(f"teacher vectors [..., {self.matrix.shape[1]}] expected, got {tuple(h_teacher.shape)}")
        h = h_teacher.float()
        if self.teacher_norm is not None:
            h = h * self.teacher_norm.to(h.device)
        return F.normalize(h, dim=-1) @ self.matrix.to(h.device).T


def build_semantic_map(teacher_head: dict, student_head: torch.Tensor, vocab_size: int,
                       recompose: str = "transpose", map_space: str = "residual") -> SemanticMap:
    """The SemanticMap from `Cache.teacher_head()` and the student's output-embedding weight."""
    if map_space not in MAP_SPACES:
        raise ValueError(f"map_space must be one of {MAP_SPACES}, got {map_space!r}")
    matrix = semantic_map(teacher_head["lm_head"], student_head.detach(), vocab_size, recompose)
    gain = None
    if map_space == "post_norm":
        gain = teacher_head["final_norm"].detach().float().to(matrix.device)
        if gain.shape != (matrix.shape[1],):
            raise ValueError(f"teacher final-norm gain has shape {tuple(gain.shape)}, expected ({matrix.shape[1]},)")
    return SemanticMap(matrix, recompose, vocab_size, map_space, gain)


def proportional_pairing(teacher_layers: int, student_layers: int) -> list[int]:
    """pairs[k-1] = p(k) = max(1, floor(L_T * k / L_S)) for student layers k = 1..L_S."""
    _check_depths(teacher_layers, student_layers)
    return [max(1, teacher_layers * k // student_layers) for k in range(1, student_layers + 1)]


def attributed_pairing(scores: np.ndarray | list[float], student_layers: int, window: int = 2,
                       critical: int = 0, distinct: bool = False) -> list[int]:
    """pairs[k-1] = p(k): the highest-scored teacher layer within +-`window` of the proportional one,
    never shallower than p(k-1) (ties: the proportional layer, then the shallower).

    `distinct` (for a teacher at least as deep as the student): p strictly increasing, each pick
    leaving a layer for every student layer after it, so no two student layers share a teacher layer
    and the scores decide which L_T - L_S teacher layers are skipped. Without it a smooth score
    profile (real attribution rises or falls steadily with depth) pins every window's pick to the
    same edge and neighbouring student layers collapse onto one teacher layer.

    `scores` are the attribution of teacher layers 0..L_T; layer 0 (embeddings) is never paired.
    `critical` > 0 (v1): each of that many top-scored teacher layers that no student layer got is
    given to the smallest k with p(k) >= it, replacing p(k) (one deeper than every pick goes to the
    last student layer). Placing them shallow to deep keeps p monotone and never displaces one
    already placed, so all of them end up paired."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) < 2:
        raise ValueError(f"attribution scores must be 1-D over teacher layers 0..L_T (length >= 2), "
                         f"got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"attribution scores must be finite, got {scores.tolist()}")
    teacher_layers = len(scores) - 1
    _check_depths(teacher_layers, student_layers)
    if window < 0:
        raise ValueError(f"pairing window must be >= 0, got {window}")
    if not 0 <= critical <= min(teacher_layers, student_layers):
        raise ValueError(f"critical layers must be in 0..min(L_T, L_S) = 0..{min(teacher_layers, student_layers)}, "
                         f"got {critical}")
    if distinct and teacher_layers < student_layers:
        raise ValueError(f"distinct pairing needs a teacher at least as deep as the student, got L_T = {teacher_layers} "
                         f"< L_S = {student_layers}")
    pairs: list[int] = []
    for k, base in enumerate(proportional_pairing(teacher_layers, student_layers), 1):
        previous = pairs[-1] if pairs else 0
        low = max(base - window, previous + 1 if distinct else previous, 1)
        high = min(base + window, teacher_layers - (student_layers - k) if distinct else teacher_layers)
        pairs.append(min(range(low, high + 1), key=lambda layer: (-scores[layer], layer != base, layer)))
    ranked = sorted(range(1, teacher_layers + 1), key=lambda layer: (-scores[layer], layer))
    placed: set[int] = set()
    for layer in sorted(ranked[:critical]):
        k = next((k for k, p in enumerate(pairs) if p >= layer), None)
        if k is not None:
            pairs[k] = layer
        else:
            # Deeper than every pick: it goes last, and the deepest pick whose loss unhits nothing
            # placed makes room (usually the last one, so this is "replace p(L_S)").
            drop = max(k for k, p in enumerate(pairs) if p not in placed or pairs.count(p) > 1)
            pairs = pairs[:drop] + pairs[drop + 1:] + [layer]
        placed.add(layer)
    return pairs


def bases_gram(bases: torch.Tensor) -> torch.Tensor:
    """B^T B [D, D] float32 (accumulated in float64): what recomposition fidelity needs of the bases."""
    return _gram(bases, bases).float()


def recomposition_fidelity(bases: torch.Tensor, h: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """[N]: cos(h, B^T B h / |h|) per row of h [N, D], i.e. how much of a state's direction survives
    decomposition and recomposition through its own bases. Pass `gram` (from `bases_gram`) when
    calling repeatedly with the same bases: the Gram is the V-sized part."""
    if gram is None:
        gram = bases_gram(bases)
    if h.dim() != 2 or h.shape[1] != gram.shape[0]:
        raise ValueError(f"h must be [N, {gram.shape[0]}], got {tuple(h.shape)}")
    h = h.float()
    return F.cosine_similarity(h, h @ gram.to(h.device), dim=-1)


def _check_depths(teacher_layers: int, student_layers: int) -> None:
    if teacher_layers < 1:
        raise ValueError(f"the teacher needs at least 1 layer, got L_T = {teacher_layers}")
    if student_layers < 1:
        raise ValueError(f"student_layers must be >= 1, got {student_layers}")


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b in float64 over row chunks: the V-sized contractions, without a float64 copy of either."""
    if len(a) != len(b):
        raise ValueError(f"row counts differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    out = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, len(a), _CHUNK_ROWS):
        chunk_b = b[start:start + _CHUNK_ROWS].to(a.device, torch.float64)
        out += a[start:start + _CHUNK_ROWS].double().T @ chunk_b
    return out


def _pinv_psd(gram: torch.Tensor, rtol: float) -> torch.Tensor:
    """Pseudo-inverse of a Gram A^T A, keeping the directions whose singular value of A (the square
    root of the eigenvalue) exceeds rtol times the largest."""
    values, vectors = torch.linalg.eigh(gram)
    top = values[-1].clamp_min(0)
    keep = values > (rtol ** 2) * top if top > 0 else torch.zeros_like(values, dtype=torch.bool)
    vectors = vectors[:, keep]
    return (vectors / values[keep]) @ vectors.T
