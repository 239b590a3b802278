"""The package's shape, checked statically (``ast``; nothing is imported).

Issue #22 set these limits for a package someone else must carry on:

- at most :data:`MAX_ROOT_MODULES` loose modules at the package root (the rest live in packages
  named by responsibility: ``optim/``, ``training/``, ``checkpoint/``, ...);
- no file over :data:`MAX_FILE_LINES` lines;
- no function over :data:`MAX_FUNCTION_LINES` lines (``def`` to its last line, docstring
  included) except those in :data:`LONG_FUNCTIONS`, at most :data:`MAX_LONG_FUNCTIONS`, each with
  its reason;
- ``optim/`` reads a param group's options through attributes of its parsed spec: at most
  :data:`MAX_GROUP_KEY_READS` string-keyed reads of a group dict, all in ``optim/spec.py``, the
  one parser of GaLore's group keys.

- no module registers anything on import: the only calls a module makes at import time, outside
  ``if __name__ == "__main__"``, are those in :data:`IMPORT_TIME_CALLS` (the package root hands the
  optimizer the engines' layouts and the job's communicator, explicitly, in one place).

``python tests/unit/test_house_rules.py`` prints the counts.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "gnlorp_dist"
MAX_ROOT_MODULES = 6
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_LONG_FUNCTIONS = 5
MAX_GROUP_KEY_READS = 10
GROUP_PARSER = "optim/spec.py"

# "path:qualified name" -> why it stays one function. Keep this short: a reason must say why
# splitting would make the code harder to read, not that nobody got to it.
LONG_FUNCTIONS: dict[str, str] = {}

# "path: call" run at import time, each with its reason.
IMPORT_TIME_CALLS: dict[str, str] = {
    "__init__.py: use_engine_layouts(detect_deepspeed_layout, detect_fsdp2_layout)": (
        "the package root is the one place the layers meet: optim/ cannot import the engines"
    ),
    "__init__.py: use_job_communicator(communicator_for_current_process)": (
        "the same hand-over for the torch.distributed group"
    ),
    "bench/plots.py: matplotlib.use('Agg')": "plots are written to files, never shown",
}

# Methods of a dict that read or write one key given as their first argument.
_KEYED_METHODS = frozenset({"get", "pop", "setdefault"})


@dataclass(frozen=True)
class Function:
    where: str  # "optim/driver.py:step_groups"
    lines: int


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE_DIR).as_posix()


def package_files() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def root_modules() -> list[str]:
    return sorted(p.name for p in PACKAGE_DIR.glob("*.py") if p.name != "__init__.py")


def file_lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def functions(path: Path) -> list[Function]:
    """Every function and method in ``path`` with its length, by qualified name."""
    found: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                assert child.end_lineno is not None
                found.append(
                    Function(f"{_relative(path)}:{name}", child.end_lineno - child.lineno + 1)
                )
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return found


def long_functions() -> list[Function]:
    return [f for path in package_files() for f in functions(path) if f.lines > MAX_FUNCTION_LINES]


def _names_a_group(node: ast.expr) -> bool:
    """``group``, ``param_group``, ``self.group``, ``step.group``, ``groups[i]``...: an
    expression whose last name says it is a param group."""
    while isinstance(node, ast.Subscript):
        node = node.value
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return "group" in name.lower()


def _is_key(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def group_key_reads(source: str) -> list[int]:
    """Lines of every string-keyed access to a param group dict in ``source``:
    ``group["rank"]``, ``group.get("bits")`` (also ``pop``/``setdefault``) and
    ``"rank" in group`` / ``not in``."""
    lines: list[int] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and _is_key(node.slice) and _names_a_group(node.value):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _KEYED_METHODS
            and node.args
            and _is_key(node.args[0])
            and _names_a_group(node.func.value)
        ):
            lines.append(node.lineno)
        elif isinstance(node, ast.Compare) and _is_key(node.left):
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)) and _names_a_group(right):
                    lines.append(node.lineno)
    return lines


def optim_group_key_reads() -> dict[str, list[int]]:
    reads = {}
    for path in sorted((PACKAGE_DIR / "optim").rglob("*.py")):
        lines = group_key_reads(path.read_text(encoding="utf-8"))
        if lines:
            reads[_relative(path)] = lines
    return reads


def test_group_key_reads_are_found_in_every_spelling() -> None:
    source = (
        "def f(group, step, param_groups, other):\n"
        "    a = group['rank']\n"
        "    b = step.group.get('bits', 32)\n"
        "    c = 'rank' in param_groups[0]\n"
        "    d = 'x' not in group\n"
        "    e = other['rank']\n"  # not a group: not counted
        "    g = group[0]\n"  # not a string key: not counted
        "    return group.setdefault('lr', 1.0)\n"
    )
    assert group_key_reads(source) == [2, 3, 4, 5, 8]


def test_functions_are_measured_def_to_end_with_qualified_names(tmp_path: Path) -> None:
    path = PACKAGE_DIR / "optim" / "__init__.py"  # any file: only the walk is under test
    assert all(f.lines >= 1 for f in functions(path))
    names = {f.where.split(":")[1] for f in functions(PACKAGE_DIR / "optim" / "adamw.py")}
    assert "GradNormLoRPAdamW.step" in names


def test_at_most_six_modules_at_the_package_root() -> None:
    modules = root_modules()
    assert len(modules) <= MAX_ROOT_MODULES, (
        f"{len(modules)} loose modules at gnlorp_dist/ ({', '.join(modules)}); at most "
        f"{MAX_ROOT_MODULES}: put a new module in the package its responsibility belongs to"
    )


def test_no_file_over_500_lines() -> None:
    big = {_relative(p): n for p in package_files() if (n := file_lines(p)) > MAX_FILE_LINES}
    assert not big, f"files over {MAX_FILE_LINES} lines: {big}; split them by responsibility"


def test_long_functions_are_few_and_each_has_a_reason() -> None:
    assert len(LONG_FUNCTIONS) <= MAX_LONG_FUNCTIONS
    assert all(reason.strip() for reason in LONG_FUNCTIONS.values())
    found = {f.where: f.lines for f in long_functions()}
    unexplained = {w: n for w, n in found.items() if w not in LONG_FUNCTIONS}
    assert not unexplained, (
        f"functions over {MAX_FUNCTION_LINES} lines without a reason in LONG_FUNCTIONS: "
        f"{unexplained}; split them by responsibility"
    )
    stale = sorted(set(LONG_FUNCTIONS) - set(found))
    assert not stale, f"LONG_FUNCTIONS names functions that are no longer long: {stale}"


def test_optim_reads_group_options_through_the_parsed_spec() -> None:
    reads = optim_group_key_reads()
    outside = {path: lines for path, lines in reads.items() if path != GROUP_PARSER}
    assert not outside, (
        f"string-keyed param-group reads outside {GROUP_PARSER}: {outside}; read the group's "
        "parsed spec (attributes) instead"
    )
    total = sum(len(lines) for lines in reads.values())
    assert total <= MAX_GROUP_KEY_READS, f"{total} string-keyed group reads in {GROUP_PARSER}"


def import_time_calls() -> list[str]:
    """Every bare call statement at a module's top level (``if __name__ == "__main__"`` blocks
    are not run on import and are left out)."""
    calls = []
    for path in package_files():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                calls.append(f"{_relative(path)}: {ast.unparse(node.value)}")
    return calls


def test_no_module_registers_anything_on_import() -> None:
    unexplained = sorted(set(import_time_calls()) - set(IMPORT_TIME_CALLS))
    assert not unexplained, (
        f"calls run at import time: {unexplained}; a module must not change another's state "
        "when imported (hand things over explicitly; see gnlorp_dist/__init__.py)"
    )


def counts() -> dict[str, object]:
    reads = optim_group_key_reads()
    lines = {
        name: sum(file_lines(p) for p in (PACKAGE_DIR.parent / name).rglob("*.py"))
        for name in ("gnlorp_dist", "gnlorp_dist/optim", "benchmarks", "tests")
    }
    return {
        "root modules": len(root_modules()),
        "files over 500 lines": sum(file_lines(p) > MAX_FILE_LINES for p in package_files()),
        "functions over 60 lines": len(long_functions()),
        "string-keyed group reads in optim/": sum(len(v) for v in reads.values()),
        **{f"lines {name}/": n for name, n in lines.items()},
    }


if __name__ == "__main__":
    for key, value in counts().items():
        print(f"{key:40} {value}")
    for f in sorted(long_functions(), key=lambda f: -f.lines):
        print(f"  {f.lines:4}  {f.where}")
