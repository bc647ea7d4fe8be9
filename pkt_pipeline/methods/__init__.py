"""Stage-two methods, registered by name like peft's tuners.

A method is a `Method` subclass decorated with `@register`. pkt's own live in this package;
another package adds one through the `pkt.methods` entry-point group
(`[project.entry-points."pkt.methods"] mine = "my_pkg.module"`): importing the module registers
it. Adding a method touches no stage.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .base import AlignContext, Method, Phase, StudentOutputs, forward_student, next_token_positions

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered by {METHODS[cls.name].__module__}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    _load_plugins()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}") from None


def available_methods() -> list[str]:
    _load_plugins()
    return sorted(METHODS)


_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for entry in entry_points(group="pkt.methods"):
            entry.load()


from . import kd, laten, seeking, semalign, sft  # noqa: E402,F401  (registers the built-in methods)

__all__ = ["AlignContext", "METHODS", "Method", "Phase", "StudentOutputs", "available_methods", "forward_student",
           "get_method", "next_token_positions", "register"]
