"""Stage-two methods and their stage-one teacher extras: one folder and one registration per method,
like peft's tuners.

    methods/
      base.py      Method, AlignContext, Phase: what a method is (the trainer owns the loop)
      teacher.py   TeacherExtra, ExtraOutput: a method's stage-one computation (`pkt extract --with`)
      registry.py  register(...), get_method, get_extra, resolve, check_sections
      <name>/      __init__.py (the register call), config.py (its settings), student.py (the Method),
                   teacher.py (its TeacherExtra, if any)

Adding a method touches no stage: a folder like these (or a package registering through the
`pkt.methods` entry-point group) and a `methods.<name>` section in the config.
"""

from __future__ import annotations

from .base import AlignContext, LayerNeed, Method, Phase, StudentOutputs, cached_topk_kl, forward_student, next_token_positions
from .registry import (REGISTRY, Registration, ResolvedMethod, auto_layers, available_extras, available_methods,
                       build_extra, check_sections, configured_methods, get_extra, get_method, method_settings_class, register, resolve,
                       teacher_settings)
from .teacher import ExtraOutput, TeacherExtra

from . import alm, kd, laten, seeking, semalign, semalign_xvocab, sft, uld  # noqa: E402,F401  (the built-in methods register themselves)

__all__ = ["AlignContext", "ExtraOutput", "LayerNeed", "Method", "Phase", "REGISTRY", "Registration", "ResolvedMethod",
           "StudentOutputs", "TeacherExtra", "auto_layers", "available_extras", "configured_methods", "available_methods", "build_extra", "cached_topk_kl",
           "check_sections", "forward_student", "get_extra", "get_method", "method_settings_class",
           "next_token_positions", "register", "resolve", "teacher_settings"]
