"""`lora-sft`: LoRA fine-tuning with cross-entropy on the answers — the control every transfer
method must beat (METHOD.md section 2)."""

from __future__ import annotations

from ...losses import cross_entropy
from ..base import Method, forward_student


class LoraSFT(Method):

    def loss(self, model, batch, phase):
        out = forward_student(model, batch, tokens=self.config.output_tokens)
        ce = cross_entropy(out.logits, out.targets)
        return ce, {"ce": ce.item()}
