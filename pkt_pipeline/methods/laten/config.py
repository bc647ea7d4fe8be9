"""LaTen's settings: the student side in `methods.laten`, the teacher side in `methods.laten.teacher`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import FRACTION, NON_NEGATIVE, POSITIVE, Checked, InvalidValue, Range

ReadoutNorm = Literal["final", "own"]


@dataclass
class LatenConfig(Checked):
    """LaTen's student side (METHOD.md section 2): train only the translator hypernetwork, one step per
    located example, then write the translated deltas into the student. The learning rate is
    `align.lr` (the peak of the one-cycle schedule); the step count is one epoch over the located
    examples (`methods.laten.teacher.locate_examples`) unless `align.steps` says otherwise; `align.batch_size`,
    `align.weight_decay` and the `align.warmup_*` keys are not used (a step is the located example plus
    `align_examples` alignment examples; the optimizer and schedule are LaTen's own, below). Every
    default here is the published value; the recipe with its sources is `pkt_pipeline/recipes.py`."""

    RANGES = dict(align_examples=NON_NEGATIVE, mse_weight=NON_NEGATIVE, hidden_size=NON_NEGATIVE, init_std=POSITIVE,
                  weight_decay=NON_NEGATIVE, betas=FRACTION, schedule_steps=NON_NEGATIVE, pct_start=FRACTION,
                  div_factor=POSITIVE, final_div_factor=POSITIVE)

    align_examples: int = 15
    """Alignment examples drawn (seeded) per step to go with the located one (published: 15 + 1)."""
    mse_weight: float = 1000.0
    """Weight of the mean square of the translated deltas, summed over module kinds (published 1000)."""
    hidden_size: int = 0
    """Width of each translator MLP's hidden layer; 0 means the teacher's width (published D_T)."""
    init_std: float = 1e-5
    """Std of the translator's normal init (published 1e-5: the edit starts as almost nothing)."""
    weight_decay: float = 0.05
    """AdamW's decoupled weight decay on the translator (published 0.05)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (beta1, beta2) (published). With `cycle_momentum` the schedule drives beta1 instead."""
    schedule_steps: int = 0
    """Length of the one-cycle learning-rate schedule; 0 means one step per example of the extract split
    (published: the schedule spans the split, and a checkpoint part-way along it is evaluated)."""
    pct_start: float = 0.1
    """Fraction of the schedule spent rising from `align.lr / div_factor` to `align.lr` (published 0.1)."""
    div_factor: float = 25.0
    """The schedule starts at `align.lr / div_factor` (torch's default, which the published code keeps)."""
    final_div_factor: float = 1.0
    """The schedule ends at `align.lr / (div_factor * final_div_factor)` (published 1)."""
    anneal_strategy: Literal["cos", "linear"] = "cos"
    """Shape of the rise and the fall: `cos` (published) or `linear`."""
    cycle_momentum: bool = True
    """Cycle beta1 inversely to the rate between torch's 0.85 and 0.95 (torch's default, which the
    published code keeps: its beta1 of 0.9 is overridden from the first step)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.betas) != 2:
            raise InvalidValue("betas", f"must be two numbers in [0, 1), got {self.betas!r}")


@dataclass
class LatenExtractConfig(Checked):
    """LaTen's teacher side (`pkt extract --with laten`, METHOD.md section 2): locate the teacher's layers
    and neurons per example and cache the selected rows/columns. The defaults below that say "published"
    are the published ones (Tan et al., ACL 2025, github.com/Trae1ounG/Neural_Incompatibility); the
    whole published recipe, with the file each value comes from, is `pkt_pipeline/recipes.py`
    (`--recipe published`)."""

    RANGES = dict(locate_examples=NON_NEGATIVE, transfer_rate=Range(0, 1, low_open=True), readout_vocab=NON_NEGATIVE,
                  seed=NON_NEGATIVE)

    extract_data: str = ""
    """Locating examples (.jsonl or TASK/SPLIT); empty means `extract.jsonl` beside the cached data."""
    align_data: str = ""
    """Alignment examples (.jsonl or TASK/SPLIT); empty means `align.jsonl` beside the cached data."""
    inject_data: str = ""
    """Where the example whose neurons receive the final injection is drawn from; empty means the
    cached data itself (the published inference samples one train-split example)."""
    locate_examples: int = 8
    """At most this many extract examples are located, one per training step, so this is the translator
    checkpoint that gets evaluated (8: the published Qwen script's `checkpoint_7`); 0 means all. The
    learning-rate schedule spans the whole extract split however many are located (`methods.laten`)."""
    transfer_rate: float = 0.1
    """Neurons per layer and module kind, as a fraction of the student's width (published 0.1)."""
    modules: list[str] = field(default_factory=lambda: ["up_proj", "down_proj", "v_proj", "o_proj"])
    """Which weights transfer: rows of up/v, columns of down/o (the published Llama run used all four)."""
    readout_norm: ReadoutNorm = "final"
    """How a component's write is read through the final norm: `final` scales by the RMS of the
    position's final residual state, as the published code does (the normaliser the real prediction
    used); `own` applies the RMSNorm to each patched state itself."""
    readout_vocab: int = 0
    """0 (published): every score reads the whole vocabulary's softmax, [neurons, D] x [D, V] per layer —
    seconds on a GPU, ~15 minutes per example for the 1.5B teacher on a 2-core CPU. N > 0: exact over
    the N likeliest tokens at that position and first order over the rest (error ~ tail mass x d^2/2;
    the largest tail mass is recorded in the manifest). Only with `readout_norm: final`."""
    seed: int = 42
    """Seeds the choice of the located and injection examples (published seed 42)."""
    storage_dtype: Literal["float16", "float32"] = "float16"
    """Dtype of the cached teacher rows: `float16` (refused on overflow) or `float32`."""
