"""The toy method's settings: the `methods.toy` section of a config (or a variant's)."""

from __future__ import annotations

from dataclasses import dataclass

from pkt_pipeline.config import FRACTION, Checked


@dataclass
class ToyConfig(Checked):
    RANGES = dict(label_smoothing=FRACTION)

    label_smoothing: float = 0.0
    """Share of each target's probability spread evenly over the vocabulary."""
