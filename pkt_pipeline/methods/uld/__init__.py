"""`uld`: Universal Logit Distillation across tokenizers (student.py), settings in config.py."""

from ..registry import register
from .config import ULDConfig
from .student import UniversalLogitDistillation

register("uld", config=ULDConfig, method=UniversalLogitDistillation)
