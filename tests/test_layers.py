"""The package's layers import downward only, and no modules import each other in a circle.

Every import counts: module level, inside functions, and under `if TYPE_CHECKING:` (a type
named in a hint is knowledge shared, so a dependency all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipekit"

#: Lowest first. A module may import its own layer and the layers before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("pipekit.errors",)),
    ("core", ("pipekit.core",)),
    ("config", ("pipekit.config",)),
    ("run", ("pipekit.run",)),
    ("cache", ("pipekit.cache",)),
    ("display", ("pipekit.display",)),
    ("tracking", ("pipekit.tracking",)),
    ("serve", ("pipekit.serve",)),
    (
        "top",
        (
            "pipekit.pipeline",
            "pipekit.panel",
            "pipekit.cli",
            "pipekit.examples",
            "pipekit.export",
            "pipekit.runlock",
            "pipekit.sweep",
        ),
    ),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every pipekit module the source of module `name` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pipekit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] == "pipekit":
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for target in imports(path.read_text(), name, path.name == "__init__.py"):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target not in (name, "pipekit"):
                targets.add(target)
        edges[name] = targets
    return edges


def layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def test_every_module_belongs_to_a_layer():
    for module in modules():
        if module != "pipekit":
            layer(module)


def test_layers_import_downward_only():
    upward = [
        f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
        for module, targets in graph().items()
        if module != "pipekit"
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []
    for root in sorted(edges):
        if root in state:
            continue
        stack = [iter(sorted(edges[root]))]
        path = [root]
        state[root] = 1
        while stack:
            for child in stack[-1]:
                if state.get(child) == 1:
                    cycles.append([*path[path.index(child) :], child])
                elif child not in state:
                    state[child] = 1
                    path.append(child)
                    stack.append(iter(sorted(edges.get(child, ()))))
                    break
            else:
                stack.pop()
                state[path.pop()] = 2
    assert cycles == []


def test_the_checker_sees_type_only_and_function_level_imports():
    """The check itself could be blind: it must count the imports that hide."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..pipeline import Pipeline\n"
        "def f():\n    from ..tracking import observer\n"
    )
    found = imports(source, "pipekit.core.example")
    assert "pipekit.pipeline" in found and "pipekit.tracking.observer" in found
