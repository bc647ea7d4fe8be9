"""The one registry of methods and their teacher extras, and how a method's config section is read.

Each method folder calls `register(name, config=..., method=..., teacher=..., teacher_config=...)` once.
A config's `methods.<name>` section holds that method's settings flat, its overrides of the shared
`align` budget under `align:`, its teacher extra's settings under `teacher:`, and (a variant) the
method it configures under `method:`:

    methods:
      semalign: {layers: [4, 8], steps_per_layer: 4}
      laten: {align: {steps: 0, lr: 3.0e-4}, align_examples: 7, teacher: {locate_examples: 8}}
      semalign-kl-only: {method: semalign, lambda_layer: 0.0}

`config.py` knows none of this (it imports no method): the stages call `check_sections` and `resolve`.
Another package adds a method through the `pkt.methods` entry-point group
(`[project.entry-points."pkt.methods"] mine = "my_pkg.module"`): importing the module registers it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from ..config import AlignConfig, ConfigError, PktConfig, _build, _deep_update, to_dict
from ..plugins import load_entry_points
from .base import LayerNeed, Method
from .teacher import TeacherExtra

RESERVED = ("method", "align", "teacher")
"""Keys of a `methods.<name>` section that are not the method's own settings."""
ENTRY_POINT_GROUPS = ("pkt.methods", "pkt.teacher_extras")
"""`pkt.teacher_extras` is read for one more version: its modules may call `register` as well."""


@dataclass(frozen=True)
class Registration:
    name: str
    method: type[Method] | None = None
    config: type | None = None
    """The method's settings dataclass, read from `methods.<name>` (flat); None: it has none."""
    teacher: type[TeacherExtra] | None = None
    """Its stage-one extra (`pkt extract --with NAME`), if any."""
    teacher_config: type | None = None
    """The extra's settings dataclass, read from `methods.<name>.teacher`."""


REGISTRY: dict[str, Registration] = {}


def register(name: str, *, config: type | None = None, method: type[Method] | None = None,
             teacher: type[TeacherExtra] | None = None, teacher_config: type | None = None) -> Registration:
    """Register a method and/or its teacher extra under `name` (the `--method` / `--with` name)."""
    if not name:
        raise ValueError("register() needs a name")
    if method is None and teacher is None:
        raise ValueError(f"register({name!r}) needs a method, a teacher extra, or both")
    for role, settings in (("config", config), ("teacher_config", teacher_config)):
        if settings is None:
            continue
        if not dataclasses.is_dataclass(settings):
            raise ValueError(f"register({name!r}): {role} must be a dataclass, got {settings!r}")
        reserved = sorted({f.name for f in dataclasses.fields(settings)} & set(RESERVED))
        if reserved:
            raise ValueError(f"register({name!r}): {settings.__qualname__} has field(s) {reserved}, which are reserved "
                             f"in a methods section ({', '.join(RESERVED)}); rename them")
    if teacher_config is not None and teacher is None:
        raise ValueError(f"register({name!r}): teacher_config without a teacher extra")
    for cls in (method, teacher):
        own = cls.__dict__.get("name", "") if cls is not None else ""
        if own and own != name:
            raise ValueError(f"register({name!r}): {cls.__qualname__} is named {own!r}")
    entry = Registration(name, method, config, teacher, teacher_config)
    if name in REGISTRY and REGISTRY[name] != entry:
        previous = REGISTRY[name].method or REGISTRY[name].teacher
        raise ValueError(f"method {name!r} is already registered by {previous.__module__}")
    for cls in (method, teacher):
        if cls is not None:
            cls.name = name
    REGISTRY[name] = entry
    return entry


def get_method(name: str) -> type[Method]:
    entry = _registration(name)
    if entry is None or entry.method is None:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(available_methods())}")
    return entry.method


def method_settings_class(name: str) -> type | None:
    """The settings dataclass registered for method `name`, or None when it has no settings of its own."""
    get_method(name)
    return REGISTRY[name].config


def get_extra(name: str) -> type[TeacherExtra]:
    entry = _registration(name)
    if entry is None or entry.teacher is None:
        known = ", ".join(available_extras()) or "none"
        raise ValueError(f"unknown teacher extra {name!r} for `pkt extract --with`; known: {known}")
    return entry.teacher


def available_methods() -> list[str]:
    _load_plugins()
    return sorted(name for name, entry in REGISTRY.items() if entry.method is not None)


def available_extras() -> list[str]:
    _load_plugins()
    return sorted(name for name, entry in REGISTRY.items() if entry.teacher is not None)


def _registration(name: str) -> Registration | None:
    _load_plugins()
    return REGISTRY.get(name)


def _load_plugins() -> None:
    for group in ENTRY_POINT_GROUPS:
        load_entry_points(group)


@dataclass(frozen=True)
class ResolvedMethod:
    """What `pkt align --method NAME` runs: the method, its typed settings and the budget it trains on."""

    name: str
    """As requested: a registered method or a variant's section name."""
    method: str
    """The registered method (a variant's `method:`)."""
    config: PktConfig
    """The whole config, `align` with the section's `align:` overrides applied and `align.method = method`."""
    settings: Any
    """An instance of the method's settings class, or None when it has none."""

    @property
    def align(self) -> AlignConfig:
        return self.config.align

    @property
    def method_class(self) -> type[Method]:
        return get_method(self.method)


def resolve(config: PktConfig, name: str) -> ResolvedMethod:
    """Read `methods.<name>` (absent means every default) into a `ResolvedMethod`; a bad key is a ConfigError
    naming it by its dotted path."""
    if name not in config.methods:
        get_method(name)  # `--method NAME` with no section of its own: refuse a typo as an unknown method
    section = _section(config, name)
    method = section.get("method", name)
    if not isinstance(method, str):
        raise ConfigError(f"methods.{name}.method must be the name of a registered method, got {method!r}")
    _check_registered(name, method)
    entry = REGISTRY[method]
    if entry.method is None:
        raise ConfigError(f"methods.{name}: {method!r} is a teacher extra (`pkt extract --with {method}`), not a "
                          f"method; registered methods: {', '.join(available_methods())}")
    overrides = section.get("align") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"methods.{name}.align must be a mapping of align keys, got {overrides!r}")
    align = to_dict(config)["align"]
    _deep_update(align, overrides)
    align["method"] = method
    resolved = dataclasses.replace(config, align=_build(AlignConfig, align, prefix=f"methods.{name}.align.", source=""))
    own = {key: value for key, value in section.items() if key not in RESERVED}
    settings = _settings(entry.config, own, name, method)
    return ResolvedMethod(name, method, resolved, settings)


def teacher_settings(config: PktConfig, name: str) -> Any:
    """The settings of teacher extra `name`, from `methods.<name>.teacher` (None when it has none)."""
    entry_class = get_extra(name)
    settings_class = REGISTRY[name].teacher_config
    raw = _section(config, name).get("teacher") or {}
    if settings_class is None:
        if raw:
            raise ConfigError(f"methods.{name}.teacher: the {entry_class.__qualname__} extra has no settings")
        return None
    return _build(settings_class, raw, prefix=f"methods.{name}.teacher.", source="")


def build_extra(config: PktConfig, name: str) -> TeacherExtra:
    """Teacher extra `name`, ready to run with its settings from `methods.<name>.teacher`."""
    return get_extra(name)(teacher_settings(config, name))


def configured_methods(config: PktConfig) -> list[str]:
    """`align.method` and every `methods.<name>` section that configures a method (a teacher extra's
    section alone does not), in that order: what `extract.layers: auto` captures for."""
    names = [config.align.method]
    for name, section in config.methods.items():
        method = section.get("method", name) if isinstance(section, dict) else name
        entry = _registration(method) if isinstance(method, str) else None
        if entry is not None and entry.method is not None:
            names.append(name)
    return list(dict.fromkeys(names))


def auto_layers(config: PktConfig, teacher_layers: int, student_layers: int,
                kinds: tuple[str, ...]) -> tuple[tuple[int, ...], dict]:
    """`extract.layers: auto`: the union of the teacher layers the configured methods read, with each
    derived delta's predecessor when `kinds` does not capture deltas, and the record of how (the manifest's
    `layers_rule`)."""
    layers: set[int] = set()
    methods = {}
    for name in configured_methods(config):
        resolved = resolve(config, name)
        need: LayerNeed | None = resolved.method_class.layer_need(resolved.settings, teacher_layers, student_layers)
        if need is None:
            methods[name] = {"layers": [], "rule": "reads no cached teacher layer"}
            continue
        wanted = set(need.layers)
        if need.kind == "delta" and "delta" not in kinds:
            wanted |= {layer - 1 for layer in need.layers}
        layers |= wanted
        methods[name] = {"layers": sorted(wanted), "kind": need.kind, "rule": need.rule}
    return tuple(sorted(layers)), {"rule": "auto", "teacher_layers": teacher_layers,
                                   "student": str(config.student), "student_layers": student_layers,
                                   "methods": methods}


def check_sections(config: PktConfig) -> None:
    """Validate every `methods` section now, so a typo in any of them fails before hours of work, not when
    that method's stage runs."""
    for name in config.methods:
        section = _section(config, name)
        entry = REGISTRY.get(section.get("method", name)) if isinstance(section.get("method", name), str) else None
        if "teacher" in section:
            if entry is None or entry.teacher is None or entry.name != name:
                extras = ", ".join(f"methods.{extra}.teacher" for extra in available_extras())
                raise ConfigError(f"methods.{name}.teacher: only a teacher extra's own section holds teacher settings "
                                  f"({extras})")
            teacher_settings(config, name)
        if entry is not None and entry.method is None:
            unknown = sorted(set(section) - {"teacher"})
            if unknown:
                raise ConfigError(f"methods.{name}: unknown key {unknown[0]!r}; {name} is a teacher extra only, "
                                  f"whose settings go under methods.{name}.teacher")
            continue
        resolve(config, name)


def _section(config: PktConfig, name: str) -> dict:
    section = config.methods.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"methods.{name} must be a mapping (the method's settings, `align:`, `teacher:`), "
                          f"got {section!r}")
    return section


def _settings(settings_class: type | None, raw: dict, name: str, method: str) -> Any:
    for key, value in raw.items():
        owned = settings_class is not None and key in {f.name for f in dataclasses.fields(settings_class)}
        if owned:
            continue
        if key == method or (key == "kd" and method == "semalign"):
            raise ConfigError(f"methods.{name}.{key} moved: write its keys directly under methods.{name}"
                              + (" (SemAlign's output term: kl_mode, kl_temperature)" if key == "kd" else ""))
        if key in {f.name for f in dataclasses.fields(AlignConfig)}:
            raise ConfigError(f"methods.{name}.{key} is a shared align key: write methods.{name}.align.{key}")
        if settings_class is None:
            raise ConfigError(f"methods.{name}: unknown key {key!r}; {method} has no settings of its own "
                              f"(overrides of the shared budget go under methods.{name}.align)")
    if settings_class is None:
        return None
    return _build(settings_class, raw, prefix=f"methods.{name}.", source="")


def _check_registered(section: str, method: str) -> None:
    """A `methods` section must name a registered method, by its own name or (a variant) by `method:`."""
    registered = available_methods()
    if method in REGISTRY:
        return
    close = difflib.get_close_matches(method, registered, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    known = ", ".join(registered)
    if method == section:
        raise ConfigError(f"methods.{section}: {section!r} is not a registered method{hint}; registered: {known}. "
                          f"A variant of a method names it: `methods: {{{section}: {{method: NAME, ...}}}}`")
    raise ConfigError(f"methods.{section}.method: {method!r} is not a registered method{hint}; registered: {known}")
