"""`kd`: offline logit distillation — KL to the teacher's cached top-k next-token distribution,
optionally plus cross-entropy (METHOD.md section 2), on the same LoRA as `lora-sft`."""

from __future__ import annotations

from ...losses import cross_entropy
from ..base import Method, cached_topk_kl, forward_student


class OfflineKD(Method):
    needs_topk = True

    def loss(self, model, batch, phase):
        settings = self.settings
        out = forward_student(model, batch, tokens=self.config.output_tokens)
        kl = cached_topk_kl(out, batch, settings.mode, settings.temperature)
        parts = {"kl": kl.item()}
        total = kl
        if settings.ce_weight:
            ce = cross_entropy(out.logits, out.targets)
            parts["ce"] = ce.item()
            total = total + settings.ce_weight * ce
        return total, parts

