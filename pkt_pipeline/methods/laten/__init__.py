"""`laten`: teacher.py (the `--with laten` extra), student.py (the translator), config.py (LatenConfig
in `methods.laten`, LatenExtractConfig in `methods.laten.teacher`)."""

from ..registry import register
from .config import LatenConfig, LatenExtractConfig
from .student import LaTen
from .teacher import LatenExtra

register("laten", config=LatenConfig, method=LaTen, teacher=LatenExtra, teacher_config=LatenExtractConfig)
