"""The map diagnostics the SemAlign papers and their reviewers argue about, from the cache alone.

Per aligned student layer k with teacher partner p(k):
- recomposition fidelity: mean cos(h, B^T B h / |h|) of the teacher's cached h_p(k) under the
  teacher's own bases, i.e. how much of a state survives decomposition and recomposition when
  B^T B is not a multiple of the identity (B is overcomplete);
- linear CKA between the student's state at layer k and the mapped teacher state M h_p(k) over the
  same tokens, before and after alignment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ...loader import CacheLoader
from ...losses import linear_cka
from ..base import forward_student
from ...residual import layer_state
from .semantic_map import SemanticMap, bases_gram, recomposition_fidelity, semantic_bases

if TYPE_CHECKING:
    from .student import SemAlign


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


def map_report(method: SemAlign, model: nn.Module, when: str, report: dict | None = None) -> dict:
    """Pairing, fidelity (before training) and CKA `before`/`after` on the first
    `methods.semalign.diagnostic_examples` cached examples."""
    cache, cfg, pairs = method.context.cache, method.config, method.pairs
    layers = tuple(sorted(set(pairs.values())))
    examples = cache.index.column("example_id").to_pylist()[: method.settings.diagnostic_examples]
    chosen = {e: cache.content_hash(e) for e in examples}
    loader = CacheLoader(cache, batch_size=cfg.batch_size, layers=layers, kind=method.teacher_kind, topk=False,
                         examples=chosen, shuffle_buffer=max(cfg.batch_size, 8))
    report = report or {"pairs": {str(k): p for k, p in pairs.items()}, "examples": len(examples),
                        "kind": method.teacher_kind, "recompose": method.settings.recompose}
    if when == "before":
        hidden = CacheLoader(cache, batch_size=cfg.batch_size, layers=layers, kind="hidden", topk=False,
                             examples=chosen, shuffle_buffer=max(cfg.batch_size, 8))
        fidelity = teacher_fidelity(hidden, cache.teacher_head()["lm_head"],
                                    list(layers), cache.manifest.tokenizer.vocab_size)
        report["fidelity"] = {str(layer): value for layer, value in fidelity.items()}
    report[f"cka_{when}"] = {str(k): v for k, v in
                             layer_similarity(model, loader, pairs, method.semantic_map, method.teacher_kind).items()}
    return report


def report_lines(report: dict) -> list[str]:
    """The map report as a table: per student layer, its teacher partner, fidelity and CKA before/after."""
    lines = [f"{'student':>8s} {'teacher':>8s} {'fidelity':>9s} {'CKA before':>11s} {'CKA after':>10s}"]
    for k, p in report["pairs"].items():
        lines.append(f"{k:>8s} {p:>8d} {report['fidelity'][str(p)]:9.3f} {report['cka_before'][k]:11.3f} "
                     f"{report['cka_after'][k]:10.3f}")
    return lines
