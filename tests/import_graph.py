"""Reading a module's imports from its source, for the tests of the import graph and of DVC's code deps.

Every `import` counts, also those inside functions (a lazy import still runs), except those under
`if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def import_targets(path: Path, package: str) -> list[tuple[str, str | None]]:
    """(module, name) per imported name of `path`, absolute (`from . import x` resolved against `package`,
    the package `path` belongs to); name None for a plain `import module`."""
    targets: list[tuple[str, str | None]] = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*parent, base]))
            targets.extend((base, alias.name) for alias in node.names)
    return targets
