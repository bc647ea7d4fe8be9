"""`kd`: offline logit distillation from the cached teacher top-k (student.py), settings in config.py."""

from ..registry import register
from .config import KDConfig
from .student import OfflineKD

register("kd", config=KDConfig, method=OfflineKD)
