"""`kd`: offline logit distillation — KL to the teacher's cached top-k next-token distribution,
optionally plus cross-entropy (METHOD.md section 2), on the same LoRA as `lora-sft`."""

from __future__ import annotations

from ...losses import cross_entropy, topk_kl
from .. import register
from ..base import Method, forward_student


@register
class OfflineKD(Method):
    name = "kd"
    needs_topk = True

    def loss(self, model, batch, phase):
        settings = self.config.kd
        out = forward_student(model, batch, tokens=self.config.output_tokens)
        kl = cached_topk_kl(out, batch, settings.mode, settings.temperature)
        parts = {"kl": kl.item()}
        total = kl
        if settings.ce_weight:
            ce = cross_entropy(out.logits, out.targets)
            parts["ce"] = ce.item()
            total = total + settings.ce_weight * ce
        return total, parts


def cached_topk_kl(out, batch, mode: str, temperature: float):
    """KL(teacher || student) at the positions `out` scored, from the cache's top-k log-probs."""
    positions = out.positions
    return topk_kl(out.logits[None], batch.topk_logprobs[positions][None], batch.topk_indices[positions][None],
                   positions.new_ones(1, int(positions.sum())), mode=mode, temperature=temperature)
