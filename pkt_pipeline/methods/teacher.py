"""Method-specific teacher computations that stage one runs on request (`pkt extract --with NAME`).

Some methods need more of the teacher than hidden states and top-k logits: Seeking its
sensitivity-chosen weight blocks as LoRA factors, LaTen its attributed neurons. Each is a
`TeacherExtra`, registered with its method (`register(name, teacher=..., teacher_config=...)` in
`registry.py`); stage one runs the ones asked for while the teacher is loaded and stores their arrays
under `extras/<name>/` with their provenance in the manifest, so stage two still needs only the
cache. An extra's settings are `methods.<name>.teacher`. Adding one touches no stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..config import PktConfig


@dataclass
class ExtraOutput:
    arrays: dict[str, np.ndarray]
    """Written into the cache as `extras/<name>/<key>`, dtype and shape as given."""
    provenance: dict = field(default_factory=dict)
    """JSON-able; stored as `manifest.extras[name]` (what was chosen, from what data)."""


class TeacherExtra:
    """Base of the registered stage-one extras. Subclasses implement `compute`; `register` names them."""

    name: ClassVar[str] = ""

    def __init__(self, settings: Any = None):
        self.settings = settings
        """The registered `teacher_config`, read from `methods.<name>.teacher`; None when it has none."""

    def compute(self, teacher, tokenizer, config: PktConfig, data_path: Path, progress: bool) -> ExtraOutput:
        """Run on the loaded teacher; `data_path` is the jsonl the cache holds."""
        raise NotImplementedError

    def inputs(self, config: PktConfig) -> dict:
        """Every setting `compute` reads beyond the cache's own identity (its config section, the student
        it shapes for, ...), JSON-able. Stored in the manifest as the extra's `inputs`; a rerun whose
        inputs differ computes the extra again instead of keeping one made for other settings."""
        return {}
