"""`alm`'s settings: `methods.alm`."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import NON_NEGATIVE, POSITIVE, Checked
from ...losses import BinaryDivergence


@dataclass
class ALMConfig(Checked):
    """Approximate Likelihood Matching (Minixhofer et al. 2025, arXiv 2503.20083): loss = distill_weight * the
    binarised divergence of aligned chunks' likelihoods + ce_weight * CE on the student's own tokens."""

    RANGES = dict(distill_weight=NON_NEGATIVE, ce_weight=NON_NEGATIVE, temperature=POSITIVE)

    distill_weight: float = 1.0
    """The chunk term's weight."""
    ce_weight: float = 0.0
    """Cross-entropy on the student's own scored tokens; 0, the ALM objective alone, as the authors' pure
    distillation runs."""
    temperature: float = 100.0
    """Chunk likelihoods enter as p^(1/temperature): 100, tokenkit's `binarization_temp` default."""
    divergence: BinaryDivergence = "binary_ce"
    """`binary_ce` (tokenkit's `alm_diff_fn` default) or `binary_kl` (the same minus the teacher's binary entropy:
    the same gradient, 0 at a perfect match)."""
