"""Every ``gnlorp-memory`` and ``gnlorp-bench`` command quoted in the docs, checked against the code.

The convention the docs follow (a quote that breaks it fails here):

- Files: README.md, docs/*.md, launch/README.md, benchmarks/README.md.
- A quoted command is a line of a fenced code block that starts with the tool's name (continued
  onto the next lines by a trailing backslash; cut at ``&&``, ``|`` or ``;``), or an inline code
  span that starts with the tool's name and an argument (it may wrap onto the next line).
  A bare name (`gnlorp-memory`) and ``--help`` are not commands.
- A ``gnlorp-memory`` command's figure sits in its ``#`` comment (code block), or in prose after
  the span, up to the end of that sentence (". ") or the next quoted command. The first
  ``<number> GiB`` there is the total the command prints in GiB (2**30 bytes), the first
  ``<number> GB`` the total in GB (1e9 bytes); at least one of the two must be there, and each
  one there must equal the computed total rounded to the decimals quoted. Other figures (older
  estimates, breakdowns) go after the command's own, or into another sentence.
- A ``gnlorp-bench`` command must parse with gnlorp-bench's parser and pass its validation
  (``resolve``, on the CPU: running it would take minutes).
- Counts of gnlorp-bench's methods are spelled as words ("eight") in docs/compare.md and in any
  paragraph that names `gnlorp-bench` (a code-block line is a paragraph of its own): "the default
  N" or "N default methods" is ``len(DEFAULT_METHODS)``, "N granular methods"
  ``len(GRANULAR_METHODS)``, any other "N methods" ``len(METHODS)``.

``launch/single_gpu_7b.sh`` is held to the same figures: its header's estimate is its own
``ESTIMATE_ARGS`` (with the defaults) computed, and each doc that describes it quotes that command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from gnlorp_dist.bench import METHODS
from gnlorp_dist.bench.cli import config_from_args as bench_config_from_args
from gnlorp_dist.bench.config import DEFAULT_METHODS, GRANULAR_METHODS, resolve
from gnlorp_dist.memory.cli import build_parser as memory_parser
from gnlorp_dist.memory.cli import config_from_args as memory_config_from_args
from gnlorp_dist.memory.cli import main as memory_main

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = ("README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
DOC_FILES += ("launch/README.md", "benchmarks/README.md")
MEMORY, BENCH = "gnlorp-memory", "gnlorp-bench"
SCRIPT_7B = "launch/single_gpu_7b.sh"
DOCS_ON_SCRIPT_7B = ("README.md", "docs/memory.md", "launch/README.md")

FIGURE = re.compile(r"(\d+(?:\.\d+)?)\s*(GiB|GB)\b")
SENTENCE_END = re.compile(r"\.(?=\s|$)")
UNITS = {"GiB": 2**30, "GB": 10**9}
WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen twenty").split()  # fmt: skip
COUNT = re.compile(
    r"\b(?P<pre>default\s+)?(?P<n>" + "|".join(WORDS) + r")\s+"
    r"(?P<post>default\s+|granular\s+)?(?P<noun>methods?\b)?",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Quote:
    """One quoted command: where it is, its arguments, and the text its figures sit in."""

    path: str
    line: int  # 1-based, the line the command starts on
    tool: str
    argv: tuple[str, ...]
    figures: str

    def where(self) -> str:
        return f"{self.path}:{self.line}: `{' '.join((self.tool, *self.argv))}`"


def _command_argv(text: str) -> list[str]:
    words = shlex.split(text)
    for i, word in enumerate(words):
        if word in ("&&", "||", "|", ";") or word.startswith(">"):
            return words[1:i]
    return words[1:]


def _paragraphs(lines: list[str]) -> list[tuple[int, str, bool]]:
    """(first line, text, is_code) per paragraph; every code-block line is its own paragraph,
    joined with its backslash continuations."""
    out: list[tuple[int, str, bool]] = []
    fenced, index = False, 0
    prose: list[str] = []
    start = 0

    def flush() -> None:
        if prose:
            out.append((start + 1, "\n".join(prose), False))
            prose.clear()

    while index < len(lines):
        line = lines[index]
        if line.lstrip().startswith("```"):
            flush()
            fenced = not fenced
        elif fenced:
            first = index
            while lines[index].rstrip().endswith("\\") and index + 1 < len(lines):
                index += 1
                line = line.rstrip()[:-1] + " " + lines[index].strip()
            out.append((first + 1, line, True))
        elif not line.strip():
            flush()
        else:
            if not prose:
                start = index
            prose.append(line)
        index += 1
    flush()
    return out


def find_quotes(text: str, path: str) -> list[Quote]:
    """Every command of either tool quoted in one document (see the module's convention)."""
    quotes = []
    for first, para, is_code in _paragraphs(text.splitlines()):
        if is_code:
            parts = re.split(r"\s#(?:\s|$)", para, maxsplit=1)
            command, comment = parts[0], (parts[1] if len(parts) > 1 else "")
            words = command.split()
            if words and words[0] in (MEMORY, BENCH):
                quotes.append(Quote(path, first, words[0], tuple(_command_argv(command)), comment))
            continue
        spans = [
            m
            for m in re.finditer(r"`([^`]+)`", para)
            if m.group(1).split()[0] in (MEMORY, BENCH) and len(m.group(1).split()) > 1
        ]
        for i, span in enumerate(spans):
            end = spans[i + 1].start() if i + 1 < len(spans) else len(para)
            after = para[span.end() : end]
            stop = SENTENCE_END.search(after)
            tool = span.group(1).split()[0]
            line = first + para.count("\n", 0, span.start())
            argv = tuple(_command_argv(span.group(1)))
            quotes.append(Quote(path, line, tool, argv, after[: stop.start()] if stop else after))
    return [q for q in quotes if "--help" not in q.argv and "-h" not in q.argv]


def doc_quotes(tool: str) -> list[Quote]:
    quotes = []
    for path in DOC_FILES:
        if (ROOT / path).exists():
            quotes += find_quotes((ROOT / path).read_text(), path)
    return [q for q in quotes if q.tool == tool]


def memory_total(argv: tuple[str, ...]) -> int:
    """``gnlorp-memory ARGV --json``'s total_bytes, run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert memory_main([*(a for a in argv if a != "--json"), "--json"]) == 0
    return json.loads(out.getvalue())["total_bytes"]


def figure_errors(quote: Quote, total: int) -> list[str]:
    """What is wrong with a quote's figures against the computed total ([] when right)."""
    firsts: dict[str, str] = {}
    for number, unit in FIGURE.findall(quote.figures):
        firsts.setdefault(unit, number)
    if not firsts:
        return [f"{quote.where()} quotes no figure (its total: {total / 2**30:.2f} GiB)"]
    errors = []
    for unit, number in firsts.items():
        decimals = len(number.partition(".")[2])
        computed = f"{total / UNITS[unit]:.{decimals}f}"
        if computed != number:
            errors.append(
                f"{quote.where()} quotes {number} {unit}; it computes {computed} {unit} "
                f"({total:,} bytes)"
            )
    return errors


def check_memory_quotes(quotes: list[Quote]) -> list[str]:
    errors = []
    for quote in quotes:
        try:
            total = memory_total(quote.argv)
        except SystemExit as exit_:
            errors.append(f"{quote.where()} does not run (exit {exit_.code})")
            continue
        errors += figure_errors(quote, total)
    return errors


def method_count_errors(text: str, path: str) -> list[str]:
    """Method counts in docs/compare.md and in paragraphs that name gnlorp-bench."""
    expected = {"default": DEFAULT_METHODS, "granular": GRANULAR_METHODS, "all": METHODS}
    errors = []
    for first, para, is_code in _paragraphs(text.splitlines()):
        if path != "docs/compare.md" and BENCH not in para:
            continue
        if is_code:
            words = para.split()
            if path == "docs/compare.md" and (not words or words[0] != BENCH):
                continue
        for m in COUNT.finditer(para):
            if m.group("pre") or (m.group("post") or "").strip().lower() == "default":
                kind = "default"
            elif m.group("noun") and m.group("post"):
                kind = "granular"
            elif m.group("noun"):
                kind = "all"
            else:
                continue
            quoted = WORDS.index(m.group("n").lower()) + 1
            if quoted != len(expected[kind]):
                line = first + para.count("\n", 0, m.start())
                errors.append(
                    f"{path}:{line}: {m.group(0).strip()!r} says {quoted} {kind} methods; "
                    f"gnlorp-bench has {len(expected[kind])} ({', '.join(expected[kind])})"
                )
    return errors


def test_every_quoted_memory_command_prints_the_figure_beside_it():
    quotes = doc_quotes(MEMORY)
    assert len(quotes) >= 10, [q.where() for q in quotes]
    errors = check_memory_quotes(quotes)
    assert not errors, "\n".join(errors)


def test_a_wrong_figure_fails_naming_file_line_quoted_and_computed():
    doc = (
        "```bash\n"
        "gnlorp-memory --model llama_7b --optimizer gradnormlorp --bits 8 --per-layer \\\n"
        "    --rank 1024 --tokens 256  # 17.55 GiB\n"
        "```\n"
        "\n"
        "Prose: `gnlorp-memory --model llama_7b --optimizer gradnormlorp --bits 8 --per-layer\n"
        "--rank 1024 --tokens 256` estimates **21.19 GB (19.73 GiB)**. It was 22.16 GiB.\n"
        "And `gnlorp-memory --model llama_7b --bits 8` has no figure; `gnlorp-memory` is a name.\n"
    )
    quotes = find_quotes(doc, "x.md")
    assert [(q.line, q.figures.strip()) for q in quotes] == [
        (2, "17.55 GiB"),
        (6, " estimates **21.19 GB (19.73 GiB)**".strip()),
        (8, "has no figure; `gnlorp-memory` is a name"),
    ]
    errors = check_memory_quotes(quotes)
    assert len(errors) == 3, errors
    assert errors[0].startswith("x.md:2: `gnlorp-memory --model llama_7b")
    assert "quotes 17.55 GiB; it computes 19.74 GiB (21,194,051,456 bytes)" in errors[0]
    assert (
        errors[1].startswith("x.md:6: ") and "quotes 19.73 GiB; it computes 19.74 GiB" in errors[1]
    )
    assert errors[2].startswith("x.md:8: ") and "quotes no figure" in errors[2]


def test_every_quoted_bench_command_parses_and_validates():
    quotes = doc_quotes(BENCH)
    assert len(quotes) >= 8, [q.where() for q in quotes]
    errors = []
    for quote in quotes:
        try:
            config = bench_config_from_args(list(quote.argv))
            resolve(dataclasses.replace(config, device="cpu"))
        except (SystemExit, ValueError) as err:
            errors.append(f"{quote.where()} is refused: {err!r}")
    assert not errors, "\n".join(errors)


def test_method_counts_in_the_docs_are_gnlorp_bench_s():
    errors = []
    for path in DOC_FILES:
        errors += method_count_errors((ROOT / path).read_text(), path)
    assert not errors, "\n".join(errors)


def test_a_wrong_method_count_fails():
    doc = "`gnlorp-bench` runs the default eight and the three granular methods, nine methods.\n"
    errors = method_count_errors(doc, "y.md")
    assert len(errors) == 1 and errors[0].startswith("y.md:1: 'nine methods' says 9 all methods")
    assert f"gnlorp-bench has {len(METHODS)}" in errors[0]


def script_estimate_argv(**overrides: str) -> list[str]:
    """launch/single_gpu_7b.sh's ESTIMATE_ARGS with its defaults (or ``overrides``) filled in."""
    text = (ROOT / SCRIPT_7B).read_text()
    env = dict(re.findall(r"^(\w+)=\$\{\1:?-([^}]*)\}", text, re.MULTILINE))
    env.update(overrides)
    a, b = re.search(r"^TOKENS=\$\(\((\w+) \* (\w+)\)\)", text, re.MULTILINE).groups()
    env["TOKENS"] = str(int(env[a]) * int(env[b]))
    body = re.search(r"^ESTIMATE_ARGS=\((.*?)\)\s*$", text, re.MULTILINE | re.DOTALL).group(1)
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], w) for w in shlex.split(body)]


def _config(argv) -> object:
    return memory_config_from_args(memory_parser().parse_args(list(argv)))


def test_single_gpu_7b_script_header_is_its_own_estimate():
    text = (ROOT / SCRIPT_7B).read_text()
    header = text.split("set -euo pipefail")[0]
    quoted = re.search(r"Estimated peak (\d+\.\d+) GiB", header)
    assert quoted, f"{SCRIPT_7B}: no 'Estimated peak N GiB' in the header"
    total = memory_total(tuple(script_estimate_argv()))
    assert quoted.group(1) == f"{total / 2**30:.2f}", (quoted.group(1), total / 2**30)
    variants = re.findall(r"(\d+\.\d+) GiB with \w+ bases, PROJ_BITS=(\d+)", header)
    for figure, bits in variants:
        total = memory_total(tuple(script_estimate_argv(PROJ_BITS=bits)))
        assert figure == f"{total / 2**30:.2f}", (SCRIPT_7B, bits, figure, total / 2**30)


@pytest.mark.parametrize("path", DOCS_ON_SCRIPT_7B)
def test_docs_quote_single_gpu_7b_script_estimate_command(path):
    """Each doc on the script quotes the script's own estimate command (whose figure the first
    test checks), so the script's figure cannot be confused with the 256-token one."""
    script = _config(script_estimate_argv())
    quotes = [q for q in doc_quotes(MEMORY) if q.path == path]
    assert any(_config(q.argv) == script for q in quotes), (
        f"{path} quotes no gnlorp-memory command with {SCRIPT_7B}'s settings: "
        f"gnlorp-memory {' '.join(script_estimate_argv())}"
    )


def design_layout_entries() -> dict[str, str]:
    """docs/design.md's package layout, ``gnlorp_dist/``'s part: ``{"optim/": its text, ...,
    "models.py": ...}``. An entry starts two spaces in (a package ``name/`` or a root module
    ``name.py``); deeper-indented lines continue it; the first unindented line ends the package."""
    text = (ROOT / "docs/design.md").read_text()
    layout = text.split("### Layout", 1)[1].split("```")[1]
    lines = layout.split("gnlorp_dist/\n", 1)[1].splitlines()
    entries: dict[str, str] = {}
    current = None
    for line in lines:
        if line and not line.startswith(" "):
            break
        head = re.match(r"^  (\S+)", line)
        if head:
            current = head.group(1)
            entries[current] = line[len(current) + 2 :]
        elif current is not None:
            entries[current] += "\n" + line
    return entries


def test_design_layout_names_every_module_in_its_package():
    """docs/design.md's package layout names every module of gnlorp_dist, each under its own
    package (``optim/``, ``integrations/deepspeed/``, ...) or as a root module."""
    entries = design_layout_entries()
    package = ROOT / "gnlorp_dist"
    missing = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.name == "__init__.py" and relative.parent == Path("."):
            named = "__init__.py" in entries
        elif relative.name in ("__init__.py", "__main__.py"):
            named = f"{relative.parent.as_posix()}/" in entries
        elif relative.parent == Path("."):
            named = relative.name in entries
        else:
            text = entries.get(f"{relative.parent.as_posix()}/", "")
            named = re.search(rf"(?<![\w.]){re.escape(relative.name)}", text) is not None
        if not named:
            missing.append(str(relative))
    assert not missing, f"docs/design.md's layout does not name, under its package: {missing}"
