"""`kd`'s settings: `methods.kd`."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import NON_NEGATIVE, POSITIVE, Checked
from ...losses import KLMode


@dataclass
class KDConfig(Checked):
    """Offline logit distillation from the cached teacher top-k (also SemAlign's output term)."""

    RANGES = dict(temperature=POSITIVE, ce_weight=NON_NEGATIVE)

    mode: KLMode = "rest"
    """`rest`: the k cached tokens plus one bucket of the remaining mass; `renormalise`: both renormalised over the k."""
    temperature: float = 1.0
    ce_weight: float = 0.0
    """`kd` only: add this times the cross-entropy on the answers."""
