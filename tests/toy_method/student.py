"""The toy method: label-smoothed cross-entropy on the tokens `align.output_tokens` selects."""

from __future__ import annotations

import torch.nn.functional as F

from pkt_pipeline.methods import Method, forward_student

from .config import ToyConfig


class ToyCE(Method):
    def loss(self, model, batch, phase):
        settings: ToyConfig = self.settings
        out = forward_student(model, batch, tokens=self.config.output_tokens)
        logits = out.logits.float()
        loss = F.cross_entropy(logits, out.targets, label_smoothing=settings.label_smoothing)
        # logged so a test can check the smoothing independently: loss = (1 - s) ce + s uniform
        ce = F.cross_entropy(logits, out.targets)
        uniform = -F.log_softmax(logits, dim=-1).mean(dim=-1).mean()
        return loss, {"ce": ce.item(), "uniform": uniform.item(), "label_smoothing": settings.label_smoothing}
