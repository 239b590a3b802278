"""Import rules of the ``gnlorp_dist`` package, checked statically (``ast``; nothing is imported).

What counts as an import:

- The import graph (no cycles) uses *module-level* imports only: the statements that run when a
  module is first imported. Imports inside functions (deferred until called) and under
  ``if TYPE_CHECKING:`` (never run) do not count; imports in class bodies, ``try`` blocks and
  other ``if`` blocks at module level do. An edge goes to the module named, the most specific
  one that exists (``from gnlorp_dist.optim import comm`` -> ``gnlorp_dist.optim.comm``,
  ``from gnlorp_dist.optim import GradNormLoRPAdamW`` -> ``gnlorp_dist.optim``); the parent
  packages Python initialises on the way are not edges, or every submodule would be in a cycle
  with ``gnlorp_dist/__init__.py``, which imports half the package.
- ``torch.distributed`` is confined to ``gnlorp_dist/distributed/`` (README, docs/design.md):
  every import statement counts, module-level, in a function or under ``TYPE_CHECKING``, and so
  does ``importlib.import_module("torch.distributed...")`` with a literal name.
- The optional engines (DeepSpeed, Accelerate) are imported at module level only under
  ``gnlorp_dist/integrations/``, so ``import gnlorp_dist`` never pays for them (DeepSpeed alone
  takes 5 s). ``transformers`` is a hard dependency that the models, data, training and
  fine-tuning modules are built on, so the same rule for it is narrower: the layers below
  ``integrations`` in the dependency order ``train -> integrations -> distributed -> optim ->
  (projection, nn)`` must not import it at module level, and no module outside those listed in
  ``TRANSFORMERS_AT_MODULE_LEVEL`` may start to.
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

# The layers under gnlorp_dist.integrations in the README's dependency order: none of them may
# need transformers to be importable.
CORE_LAYERS = (
    "gnlorp_dist.distributed",
    "gnlorp_dist.optim",
    "gnlorp_dist.projection",
    "gnlorp_dist.nn",
)

# Modules outside integrations/ that import transformers at module level today (2026-11-29).
# They build or load transformers models and tokenizers, which is what they are for. Shrink
# this set when one stops; a module not in it that starts fails the test.
TRANSFORMERS_AT_MODULE_LEVEL = frozenset(
    {
        "gnlorp_dist.bench.config",
        "gnlorp_dist.bench.methods",
        "gnlorp_dist.bench.runner",
        "gnlorp_dist.corpus",
        "gnlorp_dist.data",
        "gnlorp_dist.evaluation",
        "gnlorp_dist.finetune.loop",
        "gnlorp_dist.finetune.models",
        "gnlorp_dist.finetune.tokenizer",
        "gnlorp_dist.models",
        "gnlorp_dist.run_setup",
        "gnlorp_dist.train",
    }
)

OPTIONAL_ENGINES = ("deepspeed", "accelerate")


@dataclass(frozen=True)
class Import:
    """One imported module name, where it was written, and whether it runs at import time."""

    name: str  # absolute dotted name: "torch.distributed", "gnlorp_dist.optim.comm", ...
    names: tuple[str, ...]  # for ``from X import a, b``: ("a", "b"); () for ``import X``
    line: int
    module_level: bool  # not in a function body, not under ``if TYPE_CHECKING:``


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


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported gnlorp_dist module: line}}`` over module-level imports."""
    modules = package_modules()
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for module in modules.values():
        for imp in module.imports:
            if not imp.module_level or not imp.name.startswith(PACKAGE):
                continue
            for target in _targets(imp, modules):
                if target != module.name:
                    graph[module.name].setdefault(target, imp.line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]``, or None. Depth-first search with colours: a back edge
    to a module still on the stack closes a cycle."""
    on_stack: dict[str, int] = {}  # module -> its index in ``stack``
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        on_stack[node] = len(stack)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                return stack[on_stack[nxt] :] + [nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        del on_stack[node]
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def _format_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    modules = package_modules()
    steps = [
        f"  {a} ({modules[a].relpath}:{graph[a][b]}) imports {b}" for a, b in zip(cycle, cycle[1:])
    ]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


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
        "    import gnlorp_dist.train\n"
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
        ("gnlorp_dist.train", False),
        ("gnlorp_dist.models", True),
        ("deepspeed", True),
        ("accelerate", True),
        ("torch.distributed", False),
        ("torch.distributed.fsdp", False),
    }


def test_find_cycle_reports_the_cycle_and_none_for_a_dag() -> None:
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]


def test_the_walk_sees_the_whole_package() -> None:
    modules = package_modules()
    assert {"gnlorp_dist", "gnlorp_dist.optim.adamw", "gnlorp_dist.distributed"} <= set(modules)
    # The package root imports the distributed layer: the graph must contain that edge.
    assert "gnlorp_dist.distributed" in import_graph()["gnlorp_dist"]


# -- the rules -------------------------------------------------------------------------------------


def test_no_import_cycle_among_gnlorp_dist_modules() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (module-level imports):\n" + _format_cycle(cycle, graph)


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


def _module_level_importers(top: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for module in package_modules().values():
        for imp in module.imports:
            if imp.module_level and _under(imp.name, top):
                found.setdefault(module.name, []).append(f"{module.relpath}:{imp.line}")
    return found


@pytest.mark.parametrize("engine", OPTIONAL_ENGINES)
def test_optional_engines_are_imported_at_module_level_only_in_integrations(engine: str) -> None:
    offenders = {
        name: where
        for name, where in _module_level_importers(engine).items()
        if not _under(name, "gnlorp_dist.integrations")
    }
    assert not offenders, f"{engine} imported at module level outside integrations/: {offenders}"


def test_core_layers_do_not_import_transformers_at_module_level() -> None:
    offenders = {
        name: where
        for name, where in _module_level_importers("transformers").items()
        if any(_under(name, layer) for layer in CORE_LAYERS)
    }
    assert not offenders, f"transformers imported at module level by {offenders}"


def test_no_new_module_imports_transformers_at_module_level() -> None:
    new = {
        name: where
        for name, where in _module_level_importers("transformers").items()
        if not _under(name, "gnlorp_dist.integrations") and name not in TRANSFORMERS_AT_MODULE_LEVEL
    }
    assert not new, (
        f"transformers newly imported at module level outside integrations/: {new}; import it "
        "inside the function that needs it, or move the code to gnlorp_dist/integrations/"
    )
