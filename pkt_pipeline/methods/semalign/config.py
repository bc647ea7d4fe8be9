"""SemAlign's settings: `methods.semalign` (or a variant's section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Checked
from ...loader import TokenMask
from ...losses import KLMode

Objective = Literal["v2", "v1"]
LayerLoss = Literal["relation", "fisher"]
Recompose = Literal["transpose", "lstsq"]
MapSpace = Literal["residual", "post_norm"]
Trainable = Literal["lora", "full"]


@dataclass
class SemAlignConfig(Checked):
    """SemAlign (METHOD.md section 1). Every open point of the paper is a key here."""

    RANGES = dict(pairing_window=NON_NEGATIVE, critical_layers=NON_NEGATIVE, layers=AT_LEAST_ONE,
                  steps_per_layer=NON_NEGATIVE, lambda_layer=NON_NEGATIVE, lambda_out=NON_NEGATIVE,
                  kl_temperature=POSITIVE, diagnostic_examples=AT_LEAST_ONE)

    objective: Objective = "v2"
    """`v2`: frontier schedule, one layer trainable at a time (default); `v1`: single phase, cosine losses."""
    layer_loss: LayerLoss = "relation"
    """v2 layer term: `relation` (centred token-token geometry) or `fisher` (Fisher-weighted logit surrogate)."""
    supervise: Literal["delta", "hidden"] = "delta"
    """Align residual contributions `delta` (v2) or layer outputs `hidden` (v1)."""
    recompose: Recompose = "lstsq"
    """Teacher->student map: `lstsq` (M = pinv(B_S) B_T) or `transpose` (M = B_S^T B_T, the paper). Measured on
    the real pair's MMLU cache (bench/map_conditioning.py): transpose's M has condition number 3832 and keeps a
    median CKA of 0.23 of the teacher's token geometry, lstsq's 61 and 0.43; a head mapped onto itself is
    exact under lstsq and distorted under transpose (relation loss 1.02)."""
    map_space: MapSpace = "residual"
    """Map the raw residual stream (`residual`) or after the teacher's final-norm gain (`post_norm`)."""
    pairing: Literal["attributed", "proportional"] = "attributed"
    """`attributed` (highest attribution in a window around the proportional layer) or `proportional`."""
    pairing_window: int = 2
    pairing_distinct: bool = True
    """Attributed pairing gives every student layer its own teacher layer (strictly increasing) when the
    teacher is at least as deep; off, neighbours may share one (the METHOD.md rule: non-decreasing)."""
    pairing_score: Literal["contribution", "output"] = "contribution"
    """The attribution `attributed` pairing ranks by: each layer's `contribution` (grad x delta_l), or its
    `output` (grad x h_l, which grows with depth, so the window's deep edge wins)."""
    critical_layers: int = 0
    """v1 extra: make sure this many top-attributed teacher layers are each paired with some student layer."""
    layers: list[int] = field(default_factory=list)
    """Student layers (1..L_S) to align; empty means all."""
    steps_per_layer: int = 0
    """Steps per frontier stage; 0 splits `align.steps` (or the epochs) evenly over the stages."""
    phase_schedule: Literal["linear", "constant"] = "constant"
    """Learning rate within each frontier stage after warm-up: `constant`, or `linear` decay to 0 (a stage
    of s steps then gets (s+1)/2 steps' worth of lr: 1.5 at s=2, where a one-phase baseline gets ~s/2 per layer
    over its whole run)."""
    lambda_layer: float = 1.0
    lambda_out: float = 1.0
    kl_mode: KLMode = "rest"
    """The output term's top-k KL: `rest` or `renormalise`, as `methods.kd.mode`."""
    kl_temperature: float = 1.0
    """The output term's temperature, as `methods.kd.temperature`."""
    layer_tokens: TokenMask = "supervised"
    """The tokens the layer term aligns: `supervised` or `answer` (see `align.output_tokens`)."""
    normalise_student: bool = True
    """Normalise student rows per token in the relation loss, as the teacher's are (scale-free on both sides)."""
    trainable: Trainable = "lora"
    """What of the frontier layer trains: its `lora` adapters or its `full` weights (trained in float32)."""
    diagnostic_examples: int = 16
    """Cached examples the map report (`--report-map`) uses."""
