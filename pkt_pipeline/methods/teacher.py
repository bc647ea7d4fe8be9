"""Method-specific teacher computations that stage one runs on request (`pkt extract --with NAME`).

Some methods need more of the teacher than hidden states and top-k logits: Seeking its
sensitivity-chosen weight blocks as LoRA factors, LaTen its attributed neurons. Each is a
registered `TeacherExtra`; stage one runs the ones asked for while the teacher is loaded and
stores their arrays under `extras/<name>/` with their provenance in the manifest, so stage two
still needs only the cache. Adding one touches no stage; another package registers one through
the `pkt.teacher_extras` entry-point group, as methods do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..config import PktConfig


@dataclass
class ExtraOutput:
    arrays: dict[str, np.ndarray]
    """Written into the cache as `extras/<name>/<key>`, dtype and shape as given."""
    provenance: dict = field(default_factory=dict)
    """JSON-able; stored as `manifest["extras"][name]` (what was chosen, from what data)."""


class TeacherExtra:
    """Base of the registered stage-one extras. Subclasses set `name` and implement `compute`."""

    name: ClassVar[str] = ""

    def compute(self, teacher, tokenizer, config: PktConfig, data_path: Path, progress: bool) -> ExtraOutput:
        """Run on the loaded teacher; `data_path` is the jsonl the cache holds."""
        raise NotImplementedError

    def inputs(self, config: PktConfig) -> dict:
        """Every setting `compute` reads beyond the cache's own identity (its config section, the student
        it shapes for, ...), JSON-able. Stored in the manifest as the extra's `inputs`; a rerun whose
        inputs differ computes the extra again instead of keeping one made for other settings."""
        return {}


EXTRAS: dict[str, type[TeacherExtra]] = {}


def register_extra(cls: type[TeacherExtra]) -> type[TeacherExtra]:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    if cls.name in EXTRAS and EXTRAS[cls.name] is not cls:
        raise ValueError(f"teacher extra {cls.name!r} is already registered by {EXTRAS[cls.name].__module__}")
    EXTRAS[cls.name] = cls
    return cls


def get_extra(name: str) -> type[TeacherExtra]:
    _load_builtin_and_plugins()
    try:
        return EXTRAS[name]
    except KeyError:
        known = ", ".join(sorted(EXTRAS)) or "none"
        raise ValueError(f"unknown teacher extra {name!r} for `pkt extract --with`; known: {known}") from None


def available_extras() -> list[str]:
    _load_builtin_and_plugins()
    return sorted(EXTRAS)


_loaded = False


def _load_builtin_and_plugins() -> None:
    """Import lazily: the built-in extras import methods code that imports this module."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import laten, seeking  # noqa: F401  (register the built-in extras)

    for entry in entry_points(group="pkt.teacher_extras"):
        entry.load()
