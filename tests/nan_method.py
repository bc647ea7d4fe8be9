"""A plug-in method for the tests of a diverging run: cross-entropy that turns NaN at its third step."""

from __future__ import annotations

import torch

from pkt_pipeline.methods import Method, forward_student


class NanAtThirdStep(Method):
    """Cross-entropy, NaN from the third step on when `align.lr` is at least `diverges_at_lr`."""

    diverges_at_lr = 0.0

    def __init__(self, context):
        super().__init__(context)
        self.calls = 0

    def loss(self, model, batch, phase):
        out = forward_student(model, batch)
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(out.logits.float(), out.targets)
        diverged = self.calls > 2 and self.config.lr >= self.diverges_at_lr
        return (loss * float("nan") if diverged else loss), {}
