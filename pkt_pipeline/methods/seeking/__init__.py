"""`seeking`: teacher.py (the `--with seeking` extra), student.py (lora-sft from the cached factors),
config.py (the extra's settings, `methods.seeking.teacher`)."""

from ..registry import register
from .config import SeekingConfig
from .student import Seeking
from .teacher import SeekingExtra

register("seeking", method=Seeking, teacher=SeekingExtra, teacher_config=SeekingConfig)
