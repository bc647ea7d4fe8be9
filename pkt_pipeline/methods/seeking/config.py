"""Seeking's teacher-side settings: `methods.seeking.teacher` (stage two is lora-sft's, on the shared `align` budget)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...config import NON_NEGATIVE, Checked


@dataclass
class SeekingConfig(Checked):
    """Seeking's teacher side (`pkt extract --with seeking`, METHOD.md section 2; Zhong et al., ICLR 2024,
    github.com/maszhongming/ParaKnowTransfer): per-weight sensitivity on seed examples, the top L_S
    teacher layers, the student-shaped block of highest sensitivity in each `align.lora.target_modules`
    weight, and its rank-r SVD as LoRA factors. Stage two (`pkt align --method seeking`) starts the
    student's LoRA from them and fine-tunes as lora-sft does. The published recipe of both stages, with
    the file each value comes from, is `pkt_pipeline/recipes.py` (`--recipe published`)."""

    RANGES = dict(seed_examples=NON_NEGATIVE, rank=NON_NEGATIVE)

    seed_examples: int = 32
    """Sensitivity is summed over the first N examples of the cached data (published: 32); 0 means all."""
    sensitivity_tokens: Literal["answer", "supervised"] = "answer"
    """The tokens whose loss the sensitivity differentiates: `answer` (published: the seed examples'
    replies only, whatever `extract.train_on_inputs` says) or `supervised` (the cache's own mask, every
    token when `extract.train_on_inputs` is true)."""
    rank: int = 0
    """Rank of the cached LoRA factors; 0 means `align.lora.r` (published 16). Stage two may train a
    smaller `align.lora.r` (it keeps the leading singular directions), not a larger one."""
