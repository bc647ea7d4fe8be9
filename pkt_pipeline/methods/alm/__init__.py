"""`alm`: Approximate Likelihood Matching across tokenizers (student.py), settings in config.py."""

from ..registry import register
from .config import ALMConfig
from .student import ApproximateLikelihoodMatching

register("alm", config=ALMConfig, method=ApproximateLikelihoodMatching)
