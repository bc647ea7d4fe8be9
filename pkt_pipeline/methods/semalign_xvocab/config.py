"""`semalign-xvocab`'s settings: `methods.semalign-xvocab`, SemAlign's keys plus the chunk term's."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import POSITIVE
from ...losses import BinaryDivergence
from ..semalign.config import SemAlignConfig


@dataclass
class SemAlignXVocabConfig(SemAlignConfig):
    """SemAlign's settings (`objective: v2` only); `lambda_out` weighs the chunk likelihood term that replaces the
    top-k KL, so `kl_mode` and `kl_temperature` must stay at their defaults."""

    RANGES = {**SemAlignConfig.RANGES, "chunk_temperature": POSITIVE}

    chunk_temperature: float = 100.0
    """Chunk likelihoods enter as p^(1/chunk_temperature), as `methods.alm.temperature`."""
    divergence: BinaryDivergence = "binary_ce"
    """The chunk term's binary divergence, as `methods.alm.divergence`."""
