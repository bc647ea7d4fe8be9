"""`lora-sft`: the control every transfer method must beat (student.py); no settings of its own (LoRA is `align.lora`)."""

from ..registry import register
from .student import LoraSFT

register("lora-sft", method=LoraSFT)
