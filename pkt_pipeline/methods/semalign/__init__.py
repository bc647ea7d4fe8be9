"""`semalign`: latent semantic alignment. student.py (the Method), config.py (SemAlignConfig),
semantic_map.py (the teacher->student map and layer pairing), diagnostics.py (its `--report-map`)."""

from ..registry import register
from .config import SemAlignConfig
from .student import SemAlign

register("semalign", config=SemAlignConfig, method=SemAlign)
