"""The packages of fhir_facade depend on each other in one direction only (ADR 0025).

The graph is read from the source with `ast`, so every import counts: module level, inside
functions (the usual way a cycle is hidden) and under `if TYPE_CHECKING:`. Nodes are the first-level
packages (`fhir_facade.fhir`, `fhir_facade.store`, ...) and the top-level modules
(`fhir_facade.config`, `fhir_facade.app`, ...).
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import fhir_facade

PACKAGE = "fhir_facade"
ROOT = Path(fhir_facade.__file__).parent

# The resource-agnostic REST machinery knows nothing of the PACS, the model, OAuth, the store or the
# wiring: those depend on it, never the other way round.
FHIR_MUST_NOT_IMPORT = (
    "dicomweb",
    "dicomweb_proxy",
    "dicom_to_fhir",
    "analyze",
    "auth",
    "store",
    "resources",
    "audit",
    "sync",
    "watcher",
    "worklist",
    "reading",
    "embedded",
    "demo",
    "config",
    "app",
    "cli",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path) -> Iterator[str]:
    """Every module `path` imports, absolute, wherever the import statement stands."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                # A relative import counts from the package: the module itself for an __init__.
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            yield target
            # `from fhir_facade import config` imports the module fhir_facade.config.
            for alias in node.names:
                yield f"{target}.{alias.name}"


def _node(module: str) -> str | None:
    """The first-level package or top-level module `module` belongs to, None outside ours."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    candidate = parts[1]
    if (ROOT / candidate).is_dir() or (ROOT / f"{candidate}.py").is_file():
        return candidate
    return None


def package_graph() -> dict[str, set[str]]:
    """First-level node -> the first-level nodes it imports (self-edges left out)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        source = _node(_module_name(path))
        if source is None:
            continue
        edges = graph.setdefault(source, set())
        for imported in _imported_modules(path):
            target = _node(imported)
            if target is not None and target != source:
                edges.add(target)
    return graph


def edge_sources(source: str, target: str) -> list[str]:
    """The modules of `source` that import something of `target`, for a readable failure."""
    found: list[str] = []
    for path in sorted(ROOT.rglob("*.py")):
        if _node(_module_name(path)) != source:
            continue
        if any(_node(imported) == target for imported in _imported_modules(path)):
            found.append(_module_name(path))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path `[a, b, ..., a]`, or None when the graph is acyclic."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            state = colour.get(nxt, white)
            if state == grey:
                return [*stack[stack.index(nxt) :], nxt]
            if state == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = black
        return None

    for start in sorted(graph):
        if colour[start] == white:
            found = visit(start)
            if found:
                return found
    return None


def test_graph_reads_our_packages() -> None:
    graph = package_graph()
    assert {"fhir", "store", "resources", "auth", "app", "config"} <= set(graph)
    assert "fhir" in graph["app"]


def test_find_cycle_reports_the_path() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nodes_are_first_level_packages() -> None:
    assert _node("fhir_facade.fhir.errors") == "fhir"
    assert _node("fhir_facade.config") == "config"
    assert _node("fastapi") is None


def test_packages_import_each_other_without_cycle() -> None:
    graph = package_graph()
    cycle = find_cycle(graph)
    if cycle:
        detail = "; ".join(
            f"{a} -> {b} via {', '.join(edge_sources(a, b))}" for a, b in itertools.pairwise(cycle)
        )
        raise AssertionError(f"import cycle {' -> '.join(cycle)} ({detail})")


def test_fhir_machinery_imports_no_dicom_ai_auth_or_wiring() -> None:
    graph = package_graph()
    forbidden = sorted(graph["fhir"] & set(FHIR_MUST_NOT_IMPORT))
    detail = {name: edge_sources("fhir", name) for name in forbidden}
    assert not forbidden, f"fhir/ imports {detail}"
