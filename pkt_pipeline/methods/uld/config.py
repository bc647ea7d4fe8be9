"""`uld`'s settings: `methods.uld`."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import NON_NEGATIVE, Checked


@dataclass
class ULDConfig(Checked):
    """Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): loss = ce_weight * CE on the student's
    own tokens + distill_weight * W1 of the sorted next-token probabilities at aligned positions."""

    RANGES = dict(distill_weight=NON_NEGATIVE, ce_weight=NON_NEGATIVE)

    distill_weight: float = 1.5
    """The ULD term's weight: 1.5, the `distil_factor` of the authors' published example runs (llm-recipes README)."""
    ce_weight: float = 1.0
    """The cross-entropy term's weight (the authors' `cross_entropy_factor`, 1)."""
