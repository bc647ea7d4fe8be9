"""The map diagnostics the SemAlign papers and their reviewers argue about, from the cache alone.

Per aligned student layer k with teacher partner p(k):
- recomposition fidelity: mean cos(h, B^T B h / |h|) of the teacher's cached h_p(k) under the
  teacher's own bases, i.e. how much of a state survives decomposition and recomposition when
  B^T B is not a multiple of the identity (B is overcomplete);
- linear CKA between the student's state at layer k and the mapped teacher state M h_p(k) over the
  same tokens, before and after alignment.
"""

from __future__ import annotations

import torch
from torch import nn

from ...loader import CacheLoader
from ...losses import linear_cka
from ..base import forward_student
from ...residual import layer_state
from .semantic_map import SemanticMap, bases_gram, recomposition_fidelity, semantic_bases


@torch.no_grad()
def layer_similarity(model: nn.Module, loader: CacheLoader, pairs: dict[int, int], semantic_map: SemanticMap,
                     kind: str) -> dict[int, float]:
    """Linear CKA of student layer k against the mapped teacher layer p(k), on supervised tokens."""
    model.eval()
    student: dict[int, list[torch.Tensor]] = {k: [] for k in pairs}
    teacher: dict[int, list[torch.Tensor]] = {k: [] for k in pairs}
    device = next(model.parameters()).device
    for batch in loader:
        batch = batch.to(device)
        out = forward_student(model, batch, hidden_states=True)
        mask = batch.supervised & batch.attention_mask.bool()
        for k, p in pairs.items():
            state = layer_state(out.hidden_states, k, kind)
            student[k].append(state[mask].float())
            teacher[k].append(semantic_map.apply(batch.teacher[p])[mask])
    return {k: float(linear_cka(torch.cat(student[k]), torch.cat(teacher[k]))) for k in pairs}


@torch.no_grad()
def teacher_fidelity(loader: CacheLoader, teacher_head: torch.Tensor, layers: list[int],
                     vocab_size: int) -> dict[int, float]:
    """Mean recomposition fidelity of the cached teacher states of each layer under its own bases."""
    bases = semantic_bases(teacher_head[:vocab_size])
    gram = bases_gram(bases)
    sums = {layer: 0.0 for layer in layers}
    count = 0
    for batch in loader:
        mask = batch.supervised & batch.attention_mask.bool()
        count += int(mask.sum())
        for layer in layers:
            sums[layer] += float(recomposition_fidelity(bases, batch.teacher[layer][mask].float(), gram=gram).sum())
    return {layer: total / max(count, 1) for layer, total in sums.items()}
