"""The layers of docs/architecture.md hold: every import (module level or inside a function)
goes to the same layer or one below, ``worker`` never imports ``tasks``, and no modules import
each other in a circle.

The walk reads the source with ``ast``, so a lazy import inside a function counts like any other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: (layer, rank): a module may import its own layer and any of lower rank; two layers of the same
#: rank (seams and store) are siblings that must not import each other.
LAYERS: dict[str, tuple[str, int]] = {
    "worker.core": ("core", 0),
    "worker.seams": ("seams", 1),
    "worker.store": ("store", 1),
    "worker.engine": ("engine", 2),
    "worker": ("services", 3),
    "worker.cli": ("cli", 4),
    "worker.api": ("api", 4),
    "tasks": ("tasks", 5),
    "celeryconfig": ("tasks", 5),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    paths = [*ROOT.joinpath("worker").rglob("*.py"), *ROOT.joinpath("tasks").rglob("*.py")]
    paths.append(ROOT / "celeryconfig.py")
    # Migrations are loaded by Alembic from their folder, not imported: each carries its own
    # frozen copy of what it computes (tests/unit/test_migrations_frozen.py).
    return {module_name(p): p for p in paths if "migrations" not in p.relative_to(ROOT).parts}


def layer_of(module: str) -> tuple[str, int]:
    best = ""
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    if not best:
        raise AssertionError(f"{module} belongs to no layer")
    return LAYERS[best]


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """The project modules ``module`` imports, with the line of each import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _resolve(alias.name, known, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                yield from _resolve(target if target in known else base, known, node.lineno)


def _resolve(name: str, known: set[str], line: int) -> Iterator[tuple[str, int]]:
    # "worker.store.events.append" -> the longest known module prefix, "worker.store.events".
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            yield candidate, line
            return


MODULES = project_modules()
GRAPH = {
    module: sorted(set(imports_of(module, path, set(MODULES)))) for module, path in MODULES.items()
}


def test_every_module_belongs_to_a_layer() -> None:
    assert MODULES, "no modules found"
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_to_the_same_layer_or_below(module: str) -> None:
    """A layer imports only itself and the layers below it; siblings (seams, store) stay apart."""
    name, rank = layer_of(module)
    wrong = []
    for target, line in GRAPH[module]:
        target_name, target_rank = layer_of(target)
        upward = target_rank > rank
        sibling = target_rank == rank and target_name != name
        if upward or sibling:
            wrong.append(f"line {line}: {target} ({target_name})")
    assert not wrong, f"{module} ({name}) imports against the layers: {wrong}"


def test_no_module_under_worker_imports_tasks() -> None:
    offenders = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module.startswith("worker")
        for target, _ in targets
        if target.startswith("tasks")
    ]
    assert not offenders, offenders


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the module graph: each must be one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _ in GRAPH[node]:
            if target == node:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other in a circle: {cycles}"


def test_the_walk_sees_lazy_imports() -> None:
    """The check would be blind if function-level imports were missed: a known one is found."""
    assert any(target == "worker.reconcile" for target, _ in GRAPH["tasks.app"]), GRAPH["tasks.app"]
