"""The house's layers (docs/architecture.md), checked on the import graph drawn from the code.

Every ``import`` and ``from ... import`` of an rwkvpy module counts, at module level or inside a
function (a lazy import is still a dependency). Python's implicit import of a module's parent
packages does not. The graph must have no cycle, between modules or between the units of the
layer table (a package such as ``formats`` or a top-level module such as ``engine.py``), and no
unit may import one from a higher layer; the front ends do not import each other.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # the fast tier: needs only the package (pyproject's markers)

SRC = Path(__file__).resolve().parents[1] / "src" / "rwkvpy"  # read, never imported

#: Bottom to top: a unit imports only from its own layer and the layers below it. A unit is a
#: package under rwkvpy (``formats``) or a top-level module (``engine``); ``__init__`` is the
#: package ``rwkvpy`` itself (``import rwkvpy``), ``__main__`` every ``python -m`` entry.
LAYERS: list[tuple[str, set[str]]] = [
    ("shared", {"errors", "config", "paths", "runtime", "compiling", "numba_cache"}),
    ("block formats and vocabularies", {"quant", "tokenizers"}),
    ("files", {"formats"}),
    ("the math and its state", {"models", "state"}),
    ("fast paths", {"kernels"}),
    (
        "generation",
        {
            "sampling",
            "processors",
            "constrain",
            "generation",
            "prefix_cache",
            "generate",
            "chat",
            "engine",
        },
    ),
    ("public API", {"model", "hub", "demo", "coldstart", "__init__"}),
    ("tools", {"perplexity", "bench", "compare", "convert", "lora", "synth", "warm"}),
    ("front ends", {"server", "batch", "lm_eval_model"}),
    ("command line", {"cli", "__main__"}),
]
FRONT_ENDS = "front ends"


def module_name(path: Path) -> str:
    parts = ["rwkvpy", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[tuple[str, int]]:
    """(imported rwkvpy module, line) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "rwkvpy"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "rwkvpy":
                continue
            for alias in node.names:  # ``from pkg import sub`` imports the module pkg.sub
                sub = f"{target}.{alias.name}"
                out.add((sub if sub in known else target, node.lineno))
    return out


def graph() -> dict[str, set[tuple[str, int]]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def unit(module: str) -> str:
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__"
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of() -> dict[str, int]:
    return {u: i for i, (_, units) in enumerate(LAYERS) for u in units}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_and_relative_imports():
    g = graph()
    # batch.py imports the engine inside a method, relatively
    assert any(t == "rwkvpy.engine" for t, _ in g["rwkvpy.batch"])
    # `from .formats import gguf` names the module, not the package
    assert any(t == "rwkvpy.formats.gguf" for t, _ in g["rwkvpy.formats.vocabulary"])
    assert len(g) > 100 and sum(map(len, g.values())) > 300


def test_every_unit_has_a_layer():
    layers = layer_of()
    assert len(layers) == sum(len(u) for _, u in LAYERS), "a unit is in two layers"
    units = {unit(m) for m in modules()}
    stale = sorted(set(layers) - units)
    assert not stale, f"units of LAYERS that are not in the code (remove them there too): {stale}"
    missing = sorted(units - set(layers))
    assert not missing, (
        f"units in no layer of LAYERS (add them, and to docs/architecture.md): {missing}"
    )


def test_no_import_cycle_between_modules():
    edges = {m: {t for t, _ in ts if t != m} for m, ts in graph().items()}
    found = cycles(edges)
    assert not found, f"modules that import each other, directly or around a circle: {found}"


def test_no_import_cycle_between_units():
    edges: dict[str, set[str]] = defaultdict(set)
    for m, ts in graph().items():
        edges[unit(m)] |= {unit(t) for t, _ in ts if unit(t) != unit(m)}
    found = cycles(edges)
    assert not found, f"packages or modules that import each other: {found}"


def test_no_upward_import_and_front_ends_apart():
    layers = layer_of()
    bad = []
    for m, ts in sorted(graph().items()):
        for t, line in sorted(ts):
            a, b = unit(m), unit(t)
            if a == b:
                continue
            if layers[b] > layers[a]:
                bad.append(
                    f"{m}:{line} imports {t}: layer '{LAYERS[layers[b]][0]}' is above '{LAYERS[layers[a]][0]}'"
                )
            elif layers[a] == layers[b] and LAYERS[layers[a]][0] == FRONT_ENDS:
                bad.append(f"{m}:{line} imports {t} (front ends do not import each other)")
    assert not bad, "\n".join(bad)


def test_nothing_imports_an_entry_point():
    bad = [f"{m} imports {t}" for m, ts in graph().items() for t, _ in ts if unit(t) == "__main__"]
    assert bad == []
