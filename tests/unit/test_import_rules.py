"""Import rules of the ``gnlorp_dist`` package, checked statically (``ast``; nothing is imported).

What counts as an import: every import statement anywhere in a module (module level, class
bodies, ``try``/``if`` blocks, functions, ``if TYPE_CHECKING:``), absolute or relative, ``import
a.b`` and ``from a import b`` alike, and ``importlib.import_module("...")`` / ``__import__("...")``
with a literal name: a deferred or type-only import still ties its module to the one it names.
An import is an edge to the module it names, the most specific one that exists (``from
gnlorp_dist.optim import comm`` -> ``gnlorp_dist.optim.comm``, ``from gnlorp_dist.optim import
GradNormLoRPAdamW`` -> ``gnlorp_dist.optim``); the parent packages Python initialises on the way
are not edges, or every submodule would be in a cycle with ``gnlorp_dist/__init__.py``, which
imports half the package.

The rules:

- No import cycle among gnlorp_dist modules; each one found is reported as its chain of modules
  with the file:line of every edge.
- Layers (README, "Development": ``train -> integrations -> distributed -> optim -> (projection,
  nn)``): every import points down the order or stays within its own layer. Each module maps to
  exactly one layer by its place in the package (:data:`LAYERS`, bottom up):

  0. ``projection, nn``: the projection math inside ``optim/`` (``gnlorp_dist.optim.projection``,
     and ``gnlorp_dist.optim.vlorp`` for VLoRP/ProjFactor), which may not import the rest of
     ``optim/``, and the ``gnlorp_dist.nn`` package;
  1. ``optim``: the ``gnlorp_dist.optim`` package, and the optimizer's option groups
     (``gnlorp_dist.options.optimizer`` and the ``gnlorp_dist.options.fields`` they are built
     with);
  2. ``distributed``: the ``gnlorp_dist.distributed`` package;
  3. ``integrations``: the ``gnlorp_dist.integrations`` package (adapters any DeepSpeed,
     FSDP2 or transformers user needs, nothing of gnlorp-train's);
  4. ``train``: everything else, the applications built on the layers below: the package root
     ``gnlorp_dist/__init__.py``, gnlorp-train (the ``training``, ``checkpoint`` and ``data``
     packages, ``models``, ``device`` and the ``train`` entry module) and the ``bench``,
     ``finetune`` and ``memory`` packages. A new top-level module lands here
     unless it is added to a lower layer.
- ``torch.distributed`` is confined to ``gnlorp_dist/distributed/`` (README, docs/design.md);
  ``from torch import distributed`` counts as well.
- The optional engines (DeepSpeed, Accelerate) are imported at module level only under
  ``gnlorp_dist/integrations/``, so ``import gnlorp_dist`` never pays for them (DeepSpeed alone
  takes 5 s); the layers below ``integrations`` never import them at all (they meet an engine
  only through the layouts the package root hands the optimizer).
- ``transformers`` is a hard dependency that the models, data, training and fine-tuning modules
  are built on, so the same rule for it is narrower: the layers below ``integrations`` never
  import it, and no module outside those listed in ``TRANSFORMERS_AT_MODULE_LEVEL`` may start to
  import it at module level.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

PACKAGE = "gnlorp_dist"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE

# The README's dependency order, bottom up: (layer, the modules and packages in it). The top
# layer, "train", holds every module not named here (see the module docstring).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "projection, nn",
        ("gnlorp_dist.optim.projection", "gnlorp_dist.optim.vlorp", "gnlorp_dist.nn"),
    ),
    # The optimizer's option groups (its param-group keys, with their flags' help) sit with it:
    # the Trainer integration's GradNormLoRPConfig and every CLI build on them.
    ("optim", ("gnlorp_dist.optim", "gnlorp_dist.options.fields", "gnlorp_dist.options.optimizer")),
    ("distributed", ("gnlorp_dist.distributed",)),
    ("integrations", ("gnlorp_dist.integrations",)),
)
TOP_LAYER = "train"

# The layers under gnlorp_dist.integrations: none of them may need transformers or an optional
# engine to be importable or to run.
CORE_LAYERS = tuple(
    prefix for layer, prefixes in LAYERS if layer != "integrations" for prefix in prefixes
)

# Modules outside integrations/ that import transformers at module level today (2026-11-29).
# They build or load transformers models and tokenizers, which is what they are for. Shrink
# this set when one stops; a module not in it that starts fails the test.
TRANSFORMERS_AT_MODULE_LEVEL = frozenset(
    {
        "gnlorp_dist.bench.config",
        "gnlorp_dist.bench.methods",
        "gnlorp_dist.bench.runner",
        "gnlorp_dist.data.corpus",
        "gnlorp_dist.data.loader",
        "gnlorp_dist.training.evaluation",
        "gnlorp_dist.finetune.loop",
        "gnlorp_dist.finetune.models",
        "gnlorp_dist.finetune.tokenizer",
        "gnlorp_dist.models",
        "gnlorp_dist.training.setup",
        "gnlorp_dist.training.run",
    }
)

OPTIONAL_ENGINES = ("deepspeed", "accelerate")


@dataclass(frozen=True)
class Import:
    """One imported module name, where it was written, and whether it runs at import time."""

    name: str  # absolute dotted name: "torch.distributed", "gnlorp_dist.optim.comm", ...
    names: tuple[str, ...]  # for ``from X import a, b``: ("a", "b"); () for ``import X``
    line: int
    module_level: bool  # runs at import time: not in a function body nor under TYPE_CHECKING


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool
    imports: tuple[Import, ...]

    @property
    def relpath(self) -> str:
        return str(self.path.relative_to(PACKAGE_DIR.parent))


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of ``from <node.module> import ...``, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    # A package's own __init__ is the anchor of "from . import x"; a plain module's is its parent.
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _ImportCollector(ast.NodeVisitor):
    """Every import in a module, marked module-level or deferred."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.imports: list[Import] = []
        self._deferred = 0  # depth of function bodies and TYPE_CHECKING blocks we are inside

    def _add(self, name: str, names: tuple[str, ...], line: int) -> None:
        self.imports.append(Import(name, names, line, module_level=self._deferred == 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, (), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        name = _absolute(node, self.module, self.is_package)
        self._add(name, tuple(a.name for a in node.names), node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("x") / __import__("x") with a literal name: an import too.
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called in ("import_module", "__import__") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                self._add(first.value, (), node.lineno)
        self.generic_visit(node)

    def _deferred_body(self, node: ast.AST) -> None:
        self._deferred += 1
        self.generic_visit(node)
        self._deferred -= 1

    visit_FunctionDef = _deferred_body
    visit_AsyncFunctionDef = _deferred_body
    visit_Lambda = _deferred_body

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._deferred += 1
        for statement in node.body:
            self.visit(statement)
        self._deferred -= 1
        for statement in node.orelse:  # the runtime branch of ``if TYPE_CHECKING: ... else:``
            self.visit(statement)


@cache
def package_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        name, is_package = _module_name(path)
        collector = _ImportCollector(name, is_package)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        modules[name] = Module(name, path, is_package, tuple(collector.imports))
    return modules


def _targets(imp: Import, known: dict[str, Module]) -> Iterator[str]:
    """The gnlorp_dist modules one import statement names (see the module docstring)."""
    if not imp.names:  # import a.b.c
        name = imp.name
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            yield name
        return
    for alias in imp.names:  # from a.b import c: the submodule a.b.c if it is one, else a.b
        if f"{imp.name}.{alias}" in known:
            yield f"{imp.name}.{alias}"
        elif imp.name in known:
            yield imp.name


Graph = dict[str, dict[str, int]]
"""``{module: {imported gnlorp_dist module: line of the first import of it}}``."""


def import_graph() -> Graph:
    """The module graph over every import (module level, deferred and TYPE_CHECKING alike)."""
    modules = package_modules()
    graph: Graph = {name: {} for name in modules}
    for module in modules.values():
        for imp in module.imports:
            if not _under(imp.name, PACKAGE):
                continue
            for target in _targets(imp, modules):
                if target != module.name:
                    graph[module.name].setdefault(target, imp.line)
    return graph


def _reachable(graph: Graph, start: str) -> set[str]:
    """The modules ``start`` reaches by one or more edges (itself only through a cycle)."""
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def strongly_connected(graph: Graph) -> list[list[str]]:
    """The graph's strongly connected components of two or more modules (each holds at least one
    cycle; a module in none is in no cycle), each sorted, in sorted order. The modules that reach
    each other; a reachability walk from every module is plenty for a package's graph."""
    reach = {node: _reachable(graph, node) for node in graph}
    components = {
        tuple(sorted(other for other in reach[node] if node in reach[other]))
        for node in graph
        if node in reach[node]
    }
    return sorted(list(component) for component in components)


def _shortest_cycle_through(graph: Graph, start: str, within: set[str]) -> list[str]:
    """``[start, ..., start]``: a shortest cycle through ``start`` inside its component."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt not in within or nxt in parents:
                    continue
                parents[nxt] = node
                if nxt == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(parents[path[-1]])
                    return path[::-1]
                following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in no cycle of {sorted(within)}")


def find_cycles(graph: Graph) -> list[list[str]]:
    """Import cycles ``[a, b, ..., a]``: for every strongly connected component, a shortest
    cycle through each of its modules (the same cycle listed once). Empty for a DAG."""
    cycles: list[list[str]] = []
    seen: set[frozenset[tuple[str, str]]] = set()
    for component in strongly_connected(graph):
        for module in component:
            cycle = _shortest_cycle_through(graph, module, set(component))
            edges = frozenset(zip(cycle, cycle[1:]))
            if edges not in seen:
                seen.add(edges)
                cycles.append(cycle)
    return cycles


def _edge(graph: Graph, a: str, b: str) -> str:
    return f"{package_modules()[a].relpath}:{graph[a][b]}"


def _format_cycle(cycle: list[str], graph: Graph) -> str:
    steps = [f"    {a} ({_edge(graph, a, b)}) imports {b}" for a, b in zip(cycle, cycle[1:])]
    return "  " + " -> ".join(cycle) + "\n" + "\n".join(steps)


def layer_of(module: str) -> int:
    """``module``'s layer: its index in :data:`LAYERS`, or ``len(LAYERS)`` for the top layer."""
    for position, (_layer, prefixes) in enumerate(LAYERS):
        if any(_under(module, prefix) for prefix in prefixes):
            return position
    return len(LAYERS)


def layer_name(position: int) -> str:
    return LAYERS[position][0] if position < len(LAYERS) else TOP_LAYER


def upward_imports(graph: Graph) -> list[tuple[str, str]]:
    """Every edge ``(a, b)`` that points up the layer order (``b``'s layer above ``a``'s)."""
    return [(a, b) for a in sorted(graph) for b in sorted(graph[a]) if layer_of(b) > layer_of(a)]


def _format_upward(graph: Graph, a: str, b: str) -> str:
    return (
        f"  {_edge(graph, a, b)}: {a} ({layer_name(layer_of(a))}) imports {b} "
        f"({layer_name(layer_of(b))})"
    )


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# -- the checker itself ----------------------------------------------------------------------------


def test_collector_tells_module_level_from_deferred_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import gnlorp_dist.optim.comm\n"
        "from . import sibling\n"
        "from ..nn import WeightNormLinear\n"
        "if TYPE_CHECKING:\n"
        "    import gnlorp_dist.training.run\n"
        "else:\n"
        "    import gnlorp_dist.models\n"
        "try:\n"
        "    import deepspeed\n"
        "except ImportError:\n"
        "    pass\n"
        "class C:\n"
        "    import accelerate\n"
        "def f():\n"
        "    import torch.distributed as dist\n"
        "    importlib.import_module('torch.distributed.fsdp')\n"
    )
    collector = _ImportCollector("gnlorp_dist.optim.adamw", is_package=False)
    collector.visit(ast.parse(source))
    found = {(i.name, i.module_level) for i in collector.imports}
    assert found == {
        ("typing", True),
        ("gnlorp_dist.optim.comm", True),
        ("gnlorp_dist.optim", True),
        ("gnlorp_dist.nn", True),
        ("gnlorp_dist.training.run", False),
        ("gnlorp_dist.models", True),
        ("deepspeed", True),
        ("accelerate", True),
        ("torch.distributed", False),
        ("torch.distributed.fsdp", False),
    }


def test_find_cycles_reports_every_cycle_and_none_for_a_dag() -> None:
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == [["a", "b", "c", "a"]]
    # Two separate cycles, and a component holding two cycles that share a module.
    graph = {
        "a": {"b": 1},
        "b": {"a": 1},
        "c": {"d": 1},
        "d": {"c": 1, "e": 1},
        "e": {"d": 1},
        "f": {"a": 1},
    }
    assert strongly_connected(graph) == [["a", "b"], ["c", "d", "e"]]
    assert find_cycles(graph) == [["a", "b", "a"], ["c", "d", "c"], ["e", "d", "e"]]


def test_layers_order_the_readme_names() -> None:
    assert [layer_name(i) for i in range(len(LAYERS) + 1)] == [
        "projection, nn",
        "optim",
        "distributed",
        "integrations",
        "train",
    ]
    assert layer_of("gnlorp_dist.nn.surgery") == layer_of("gnlorp_dist.optim.vlorp") == 0
    assert layer_of("gnlorp_dist.optim.adamw") == 1
    assert layer_of("gnlorp_dist.integrations.deepspeed.config") == 3
    assert layer_of("gnlorp_dist.training.run") == layer_of("gnlorp_dist") == len(LAYERS)
    assert layer_of("gnlorp_dist.optimizers") == len(LAYERS)  # a prefix is a package, not text
    graph = {
        "gnlorp_dist.optim": {"gnlorp_dist.nn": 3, "gnlorp_dist.optim.comm": 4},
        "gnlorp_dist.optim.comm": {},
        "gnlorp_dist.nn": {"gnlorp_dist.optim": 5},
    }
    assert upward_imports(graph) == [("gnlorp_dist.nn", "gnlorp_dist.optim")]


def test_the_walk_sees_the_whole_package() -> None:
    modules = package_modules()
    assert {"gnlorp_dist", "gnlorp_dist.optim.adamw", "gnlorp_dist.distributed"} <= set(modules)
    # The package root imports the distributed layer: the graph must contain that edge.
    assert "gnlorp_dist.distributed" in import_graph()["gnlorp_dist"]
    # Every layer below the top names modules that exist: a rename cannot empty a rule.
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            assert prefix in modules, f"layer {layer!r} names {prefix}, which does not exist"


# -- the rules -------------------------------------------------------------------------------------


def test_no_import_cycle_among_gnlorp_dist_modules() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s), counting every import:\n" + "\n".join(
        _format_cycle(cycle, graph) for cycle in cycles
    )


def test_imports_point_down_the_layers_or_stay_within_one() -> None:
    graph = import_graph()
    upward = upward_imports(graph)
    assert not upward, (
        "imports up the layer order train -> integrations -> distributed -> optim -> "
        "(projection, nn):\n" + "\n".join(_format_upward(graph, a, b) for a, b in upward)
    )


def test_only_gnlorp_dist_distributed_imports_torch_distributed() -> None:
    offenders = [
        f"{module.relpath}:{imp.line} imports {imp.name}"
        for module in package_modules().values()
        if not _under(module.name, "gnlorp_dist.distributed")
        for imp in module.imports
        # ``from torch import distributed`` names it as well as ``import torch.distributed``.
        if _under(imp.name, "torch.distributed")
        or (imp.name == "torch" and "distributed" in imp.names)
    ]
    assert not offenders, "torch.distributed outside gnlorp_dist/distributed/:\n" + "\n".join(
        offenders
    )


def _importers(top: str, *, module_level_only: bool) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for module in package_modules().values():
        for imp in module.imports:
            if (imp.module_level or not module_level_only) and _under(imp.name, top):
                found.setdefault(module.name, []).append(f"{module.relpath}:{imp.line}")
    return found


def _in_core_layer(name: str) -> bool:
    return any(_under(name, layer) for layer in CORE_LAYERS)


@pytest.mark.parametrize("engine", OPTIONAL_ENGINES)
def test_optional_engines_are_imported_at_module_level_only_in_integrations(engine: str) -> None:
    offenders = {
        name: where
        for name, where in _importers(engine, module_level_only=True).items()
        if not _under(name, "gnlorp_dist.integrations")
    }
    assert not offenders, f"{engine} imported at module level outside integrations/: {offenders}"


@pytest.mark.parametrize("dependency", (*OPTIONAL_ENGINES, "transformers"))
def test_core_layers_never_import_engines_or_transformers(dependency: str) -> None:
    offenders = {
        name: where
        for name, where in _importers(dependency, module_level_only=False).items()
        if _in_core_layer(name)
    }
    assert not offenders, f"{dependency} imported by the layers below integrations: {offenders}"


def test_no_new_module_imports_transformers_at_module_level() -> None:
    new = {
        name: where
        for name, where in _importers("transformers", module_level_only=True).items()
        if not _under(name, "gnlorp_dist.integrations") and name not in TRANSFORMERS_AT_MODULE_LEVEL
    }
    assert not new, (
        f"transformers newly imported at module level outside integrations/: {new}; import it "
        "inside the function that needs it, or move the code to gnlorp_dist/integrations/"
    )
