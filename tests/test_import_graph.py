"""The import graph of landlens: no cycle between its modules, counting imports made inside
functions; each layer of the flow imports only the layers below it; and no import of another
module's private (``_name``) objects.

Imports inside functions keep ``import landlens`` light, but they still bind the two modules
together: a cycle hidden that way makes the layering (folder -> dataset -> backbone -> feature
store -> fusion -> archive -> metrics) impossible to read. The graph is built from the source
with :mod:`ast` (nothing is imported), and cycles are found by Tarjan's algorithm through
``graphlib``-free depth-first search, with every cycle listed in the failure message.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "landlens"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The landlens module ``name`` refers to (itself, or the package holding the attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """``(edges, private imports)``: module -> landlens modules it imports (anywhere in it, except
    under ``if TYPE_CHECKING:``), and every ``from X import _name`` of a landlens module."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for b in node.body for n in ast.walk(b))
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[tuple[str, str | None]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node, path.name == "__init__.py")
                targets = [(f"{base}.{a.name}", a.name) for a in node.names]
            for full, name in targets:
                if not full.startswith(PACKAGE + ".") and full != PACKAGE:
                    continue
                owner = _owner(full, modules)
                if owner is None or owner == mod:
                    continue
                if owner != PACKAGE:  # the package's lazy front door imports nothing at import time
                    edges[mod].add(owner)
                if name is not None and name.startswith("_") and not name.startswith("__") and full not in modules:
                    private.append(f"{mod} imports {name} from {owner}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports() -> None:
    edges, _ = import_graph()
    assert "landlens.models.registry" in edges["landlens.features.cache"]  # a module-level import
    assert sum(len(v) for v in edges.values()) > 200


def test_no_cycle_between_landlens_modules() -> None:
    found = cycles(import_graph()[0])
    assert not found, "import cycles (counting imports inside functions):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_no_private_name_is_imported_from_another_module() -> None:
    _, private = import_graph()
    assert not private, "private names imported across modules:\n" + "\n".join(private)


LAYERS = ("errors", "atomic", "hashing", "config", "reports", "scenes", "data", "models", "features", "retrieval",
          "training", "matching", "service", "cli")
"""The flow, bottom first: a module may import its own layer and the layers before it.

``scenes`` (GeoTIFF reading by windows, tiling, footprints, GeoJSON; rasterio and numpy only) sits
just below ``data``: a chip of a scene is read wherever an image file is (``data.io.load_rgb``, hence
the one decode path), so the image readers must be able to call it; archives of scenes and searches
by place build on it from ``retrieval``."""


def test_each_layer_imports_only_the_layers_below_it() -> None:
    edges, _ = import_graph()
    rank = {name: i for i, name in enumerate(LAYERS)}

    def layer(module: str) -> str:
        return module.split(".")[1] if module.count(".") else "landlens"

    assert {layer(m) for m in edges} - {"landlens"} <= set(LAYERS), "a new top-level module: place it in LAYERS"
    upward = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs
                    if layer(a) in rank and layer(b) in rank and rank[layer(b)] > rank[layer(a)])
    assert not upward, "imports against the flow " + " < ".join(LAYERS) + ":\n" + "\n".join(upward)


def test_cycle_finder_on_a_hand_made_graph() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(g) == [["a", "b", "c"]]
