"""The import graph of pkt's own code: no cycle, no component importing orchestration, and each method
in its folder.

Edges are read from the source (every `import`, also those inside functions; not those under
`if TYPE_CHECKING:`, which never run), each to the module it names: `from pkg import name` goes to
`pkg.name` when that is a module, else to `pkg`. A submodule's import also runs its packages'
`__init__`, but that is Python's mechanics, not a dependency the importing module chose, so it is
not an edge.
"""

from __future__ import annotations

from pathlib import Path

from conftest import PROJECT_ROOT
from import_graph import import_targets

ROOTS = ("pkt_pipeline", "stages")
METHODS = "pkt_pipeline.methods"
CROSS_METHOD_IMPORTS = {("seeking", "sft"), ("semalign_xvocab", "semalign"), ("semalign_xvocab", "alm")}
"""Method folders that build on another: Seeking's stage two *is* lora-sft, started from cached factors;
semalign-xvocab is SemAlign with alm's chunk term as its output term."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for root in ROOTS for path in sorted((PROJECT_ROOT / root).rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports: `from pkg import name` goes to `pkg.name` when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {f"{base}.{item}" if f"{base}.{item}" in known else base for base, item in import_targets(path, package)}
    return {target for target in found if target in known and target != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, pending = set(), [start]
    while pending:
        node = pending.pop()
        if node not in seen:
            seen.add(node)
            pending.extend(edges[node])
    return seen


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_component_imports_orchestration():
    """Only the CLI, which parses arguments and calls a stage, sits above the stages."""
    upward = sorted((source, target) for source, targets in graph().items() if source.startswith("pkt_pipeline")
                    for target in targets if target.startswith("stages") and source != "pkt_pipeline.cli")
    assert upward == []


def test_config_imports_no_method():
    reached = closure(graph(), "pkt_pipeline.config")
    assert not {name for name in reached if name.startswith(METHODS)}, sorted(reached)


def test_each_method_lives_in_its_own_folder():
    edges = graph()
    folders = {name.split(".")[2] for name in edges if name.startswith(METHODS + ".") and
               (PROJECT_ROOT / "pkt_pipeline" / "methods" / name.split(".")[2]).is_dir()}
    assert folders == {"alm", "kd", "laten", "seeking", "semalign", "semalign_xvocab", "sft", "uld"}
    crossing = set()
    for source, targets in edges.items():
        for target in targets:
            if source.startswith(METHODS + ".") and target.startswith(METHODS + "."):
                a, b = source.split(".")[2], target.split(".")[2]
                if a in folders and b in folders and a != b:
                    crossing.add((a, b))
    assert crossing == CROSS_METHOD_IMPORTS
    # only the registry's package imports the folders; the stages and components name a method by its string
    importers = {source for source, targets in edges.items() for target in targets
                 if any(target == f"{METHODS}.{folder}" or target.startswith(f"{METHODS}.{folder}.") for folder in folders)
                 and not source.startswith(METHODS)}
    assert importers == set()
