"""The one-GPU check: what the CPU suite cannot prove, measured on a real CUDA device.

    python benchmarks/gpu_check.py                        # every section, under 8 min on one GPU
    python benchmarks/gpu_check.py --quick --sections tests,deepspeed
    python benchmarks/gpu_check.py --dry-run              # the plan; touches no GPU
    make gpu-check

Sections (each in its own subprocess, so a crash or a hang in one cannot hide the others):

- ``tests``: ``pytest -m gpu tests/gpu`` (galore-torch equality, weight norm, 8-bit states,
  per-layer mode, a bf16-autocast run, checkpoints moving between CUDA and CPU);
- ``bench``: ``gnlorp-bench --device cuda`` on llama_60m and llama_130m (seq 256): tokens/s and
  peak GPU memory of adamw, adamw8bit, galore, gradnormlorp, gradnormlorp8bit, as ratios to AdamW;
- ``recipe_7b``: the single-GPU 7B recipe (bf16, 8-bit states, per-layer, rank 1024): measured peak
  against the ``gnlorp-memory`` estimate and the paper's figures (nothing is saved to disk);
- ``deepspeed``: ``deepspeed.initialize`` at ZeRO 2 and 3 on one GPU (nccl) against the run
  without DeepSpeed.

Writes ``--out`` (JSON) and prints one table row per check (PASS/FAIL/SKIP with figures); exits 1
if any check failed, 2 on bad arguments or when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: make the repository importable
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check.json"
BENCH_DIRS = [DEFAULT_OUT.parent]
"""Where the bench section leaves gnlorp-bench's files (beside ``--out``; set by the worker)."""
NO_CUDA = "no CUDA device: gpu_check needs one GPU; run it where torch.cuda.is_available()"
SECTIONS: dict[str, tuple[str, int]] = {
    "tests": ("pytest -m gpu tests/gpu", 150),
    "bench": ("gnlorp-bench on CUDA: llama_60m, llama_130m, seq 256, 5 methods vs adamw", 150),
    "recipe_7b": ("llama_7b bf16, 8-bit, per-layer, rank 1024: peak vs estimate and paper", 210),
    "deepspeed": ("deepspeed.initialize ZeRO 2 and 3, one GPU (nccl) vs no DeepSpeed", 120),
}
"""Name: (what it runs, its time limit in seconds)."""
BUDGET_S = 470
"""The whole check stays under 8 minutes: a section that would start with less than
:data:`MIN_START_S` of this left is skipped, and each runs at most until the budget ends."""
MIN_START_S = 30
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

BENCH_MODELS = ("llama_60m", "llama_130m")
BENCH_METHODS = ("adamw", "adamw8bit", "galore", "gradnormlorp", "gradnormlorp8bit")
BENCH_SEQ_LEN, BENCH_BATCH = 256, 8
BENCH_STEPS = {False: 40, True: 12}  # keyed by --quick

PAPER_7B_GB = 20.07  # GradNormLoRP paper, LLaMA 7B on one GPU (8-bit, per-layer)
GALORE_7B_GB = 22.72  # GaLore paper, same setting
ESTIMATE_TOLERANCE = 0.15
"""The measured peak allocated may differ from the estimate by this fraction: the estimator
counts live tensors, not cuBLAS/cuSOLVER workspaces or the allocator's 512-byte rounding."""

DS_STEPS = {False: 10, True: 6}
DS_GAP = {False: 5, True: 3}
DS_TOLERANCE = 1e-4  # fp32, TF32 off: summation order alone (the CPU test measures ~4e-5)


def row(check: str, status: str, figures: str = "", **data: Any) -> dict[str, Any]:
    return {"check": check, "status": status, "figures": figures, "data": data}


# -- sections (each runs in a worker subprocess) --------------------------------------------------


def section_tests(quick: bool, device: str, work: Path) -> list[dict[str, Any]]:
    """The GPU-marked tests, one row per test (from pytest's JUnit XML)."""
    junit = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*cmd, f"--junitxml={junit}"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if not junit.exists():
        return [row("pytest -m gpu tests/gpu", FAIL, f"rc {done.returncode}: {_tail(done)}")]
    rows = []
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        seconds = float(case.get("time", 0.0))
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            message = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
            rows.append(row(name, FAIL, f"{seconds:.1f} s: {message}", seconds=seconds))
        elif skipped is not None:
            rows.append(row(name, SKIP, skipped.get("message", "")[:160], seconds=seconds))
        else:
            rows.append(row(name, PASS, f"{seconds:.1f} s", seconds=seconds))
    if not rows:
        rows.append(row("pytest -m gpu tests/gpu", FAIL, f"no test ran: {_tail(done)}"))
    return rows


def section_bench(quick: bool, device: str, work: Path) -> list[dict[str, Any]]:
    """gnlorp-bench's runner and methods on the GPU: tokens/s and peak memory vs adamw."""
    import torch

    from gnlorp_dist.bench import BenchConfig, run

    rows = []
    for model in BENCH_MODELS:
        config = BenchConfig(
            methods=BENCH_METHODS,
            model=model,
            steps=BENCH_STEPS[quick],
            batch_size=BENCH_BATCH,
            seq_len=BENCH_SEQ_LEN,
            eval_batches=2,
            loss_window=5,
            log_every=max(1, BENCH_STEPS[quick] // 2),
            device=device,
            threads=torch.get_num_threads(),
            output_dir=str(BENCH_DIRS[0] / f"gpu_check_bench_{model}"),
        )
        payload = run(config)
        for method, r in payload["methods"].items():
            loss = r["final_train_loss"]
            ok = r["diverged_at"] is None and loss is not None and math.isfinite(loss)
            memory = r.get("memory") or {}
            figures = (
                f"{r.get('tokens_per_s', math.nan):,.0f} tok/s "
                f"(x{r.get('tokens_per_s_ratio_to_adamw', math.nan):.2f}), "
                f"peak {memory.get('peak_bytes', 0) / 2**20:,.0f} MiB "
                f"(x{r.get('peak_memory_ratio_to_adamw', math.nan):.2f}), loss {loss:.3f}"
            )
            keys = ("tokens_per_s", "tokens_per_s_ratio_to_adamw", "peak_memory_ratio_to_adamw")
            rows.append(
                row(
                    f"bench {model} {method}",
                    PASS if ok else FAIL,
                    figures,
                    final_train_loss=loss,
                    memory=memory,
                    **{k: r.get(k) for k in keys},
                )
            )
    return rows


def recipe_7b_config(device: str, data: str, output_dir: str) -> Any:
    """The single-GPU 7B recipe as a RunConfig; nothing of it is ever saved (save_every 0, and
    the loop below never reaches the end-of-run save)."""
    from gnlorp_dist.run_config import RunConfig

    return RunConfig(
        model="llama_7b", dtype="bf16", bits=8, per_layer=True, rank=1024, seq_len=256,
        batch_size=1, max_steps=3, device=device, optimizer="gradnormlorp", data=data,
        output_dir=output_dir, save_every=0, resume="never", progress=False, eval_batches=1,
    )  # fmt: skip


def recipe_7b_estimate() -> Any:
    """``gnlorp-memory --model llama_7b --optimizer gradnormlorp --bits 8 --per-layer
    --rank 1024 --tokens 256`` (bf16 weights; the step 0 refresh included)."""
    from gnlorp_dist.memory import MemoryConfig, estimate_memory

    return estimate_memory(
        MemoryConfig(
            model="llama_7b",
            optimizer="gradnormlorp",
            bits=8,
            rank=1024,
            per_layer=True,
            tokens=256,
            seq_len=256,
            dtype="bf16",
        )  # fmt: skip
    )


def section_recipe_7b(quick: bool, device: str, work: Path) -> list[dict[str, Any]]:
    """prepare() + train_step (not train(): it saves a 14 GB checkpoint and merged model)."""
    import torch

    from gnlorp_dist.corpus import shakespeare_documents
    from gnlorp_dist.device import memory_stats, to_device
    from gnlorp_dist.steps import train_step
    from gnlorp_dist.train import prepare

    text = work / "text.txt"  # a small local text: tokenising the whole corpus is not the point
    text.write_text(shakespeare_documents()[0][:200_000])
    started = time.perf_counter()
    run = prepare(recipe_7b_config(device, str(text), str(work / "run")))
    built_s = time.perf_counter() - started
    c = run.config
    torch.cuda.synchronize(run.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(run.device)
    losses, started = [], time.perf_counter()
    for _ in range(c.max_steps):
        batch = to_device(run.data.train.next_batch(), run.device)
        micro = list(batch.view(c.grad_accum, c.batch_size, c.seq_len))
        stats = train_step(
            run.forward_model, run.optimizer, run.scheduler, micro, c.grad_clip, True
        )
        losses.append(stats.loss)
    torch.cuda.synchronize(run.device)
    step_s = (time.perf_counter() - started) / c.max_steps
    measured = memory_stats(run.device)
    estimate = recipe_7b_estimate()
    peak = measured["max_memory_allocated"]
    ratio = peak / estimate.total_bytes
    finite = all(math.isfinite(x) for x in losses)
    return [
        row(
            "7B recipe: steps",
            PASS if finite else FAIL,
            f"{c.max_steps} steps, loss {' '.join(f'{x:.3f}' for x in losses)}, "
            f"{step_s:.2f} s/step (built in {built_s:.0f} s)",
            losses=losses,
            step_s=step_s,
            build_s=built_s,
        ),
        row(
            "7B recipe: peak vs estimate",
            PASS if abs(ratio - 1) <= ESTIMATE_TOLERANCE else FAIL,
            f"measured {peak / 1e9:.2f} GB ({peak / 2**30:.2f} GiB) allocated, "
            f"{measured['max_memory_reserved'] / 1e9:.2f} GB reserved; estimate "
            f"{estimate.total_bytes / 1e9:.2f} GB (x{ratio:.3f}); paper {PAPER_7B_GB} GB, "
            f"GaLore {GALORE_7B_GB} GB",
            **measured,
            estimate_bytes=estimate.total_bytes,
            estimate_peak_moment=estimate.peak_moment,
            ratio_to_estimate=ratio,
            paper_gb=PAPER_7B_GB,
            galore_gb=GALORE_7B_GB,
        ),
    ]


def _ds_model(device: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gnlorp_dist import apply_weight_norm

    llama = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=347, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip  # an odd intermediate size: ZeRO cuts some matrices inside a row
    torch.manual_seed(11)
    return apply_weight_norm(LlamaForCausalLM(llama)).to(device)


def _ds_batch(step: int, device: Any) -> Any:
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, 512, (4, 1), generator=gen)
    stride = torch.randint(1, 4, (4, 1), generator=gen)  # learnable sequences: the loss falls
    return ((start + stride * torch.arange(32)) % 512).to(device)


def section_deepspeed(quick: bool, device: str, work: Path) -> list[dict[str, Any]]:
    """ZeRO 2 and 3 at world size 1 over nccl (gloo on the hidden --device cpu)."""
    import torch

    from gnlorp_dist.device import resolve_device

    target = resolve_device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 equality, not TF32's 10-bit mantissa
        torch.backends.cudnn.allow_tf32 = False
    else:  # before deepspeed is first imported: it picks its accelerator then
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from gnlorp_dist import GradNormLoRPAdamW, projected_param_groups
    from gnlorp_dist.integrations.deepspeed import check_deepspeed_config

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # CPU only: skip a JIT build
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    deepspeed.init_distributed(dist_backend="nccl" if target.type == "cuda" else "gloo")
    steps, gap = DS_STEPS[quick], DS_GAP[quick]

    def optimizer_for(model: Any) -> Any:
        groups = projected_param_groups(model, rank=8, update_proj_gap=gap, scale=0.25)
        return GradNormLoRPAdamW(groups, lr=1e-2, weight_decay=0.01)

    model = _ds_model(target)
    initial = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    reference = optimizer_for(model)
    ref_losses = []
    for step in range(steps):
        reference.zero_grad()
        ids = _ds_batch(step, target)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        reference.step()
        ref_losses.append(float(loss))
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    moved = float((expected - initial).norm() / initial.norm())
    rows = []
    for stage in (2, 3):
        config = check_deepspeed_config(
            {
                "train_micro_batch_size_per_gpu": 4,
                "train_batch_size": 4,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 0,
                "zero_allow_untested_optimizer": True,
                "zero_optimization": {"stage": stage},
            }  # fmt: skip
        )
        model = _ds_model(target)
        optimizer = optimizer_for(model)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        losses = []
        for step in range(steps):
            ids = _ds_batch(step, engine.device)
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        weights = torch.cat(
            [
                safe_get_full_fp32_param(p).reshape(-1).to(expected.device)
                for p in model.parameters()
            ]
        )
        error = float((weights - expected).norm() / expected.norm())
        refreshes, wanted = optimizer.refresh_count, reference.refresh_count
        ok = error < DS_TOLERANCE and refreshes == wanted > 0 and moved > 1e-2
        rows.append(
            row(
                f"deepspeed ZeRO-{stage}",
                PASS if ok else FAIL,
                f"{error:.1e} relative to no DeepSpeed after {steps} steps (weights moved "
                f"{moved:.1e}); {refreshes} SVDs (expected {wanted}); loss {losses[0]:.3f} -> "
                f"{losses[-1]:.3f}",
                relative_error=error,
                refresh_count=refreshes,
                expected_refresh_count=wanted,
                losses=losses,
                reference_losses=ref_losses,
            )
        )
        del engine, optimizer, model
    torch.distributed.destroy_process_group()
    return rows


WORKERS = {
    "tests": section_tests,
    "bench": section_bench,
    "recipe_7b": section_recipe_7b,
    "deepspeed": section_deepspeed,
}
assert tuple(WORKERS) == tuple(SECTIONS)


# -- the driver -----------------------------------------------------------------------------------


def _tail(done: subprocess.CompletedProcess | subprocess.TimeoutExpired, limit: int = 600) -> str:
    text = "".join(
        part.decode() if isinstance(part, bytes) else (part or "")
        for part in (done.stdout, done.stderr)
    )
    return " ".join(text.split())[-limit:]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_check",
        description="One-GPU acceptance check; writes JSON and prints a PASS/FAIL/SKIP table.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps in every section")
    parser.add_argument(
        "--sections", nargs="+", default=None, metavar="NAME",
        help=f"sections to run, space- or comma-separated (default: all: {', '.join(SECTIONS)})",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the arguments, print the plan"
    )
    # Development only: run the sections' code on another device (e.g. cpu); not a GPU check.
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, ``sections`` resolved to a tuple of known names (exit 2 otherwise)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [part for value in args.sections or list(SECTIONS) for part in value.split(",") if part]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        parser.error(
            f"--sections: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}"
            if unknown
            else "--sections is empty"
        )  # parser.error exits with status 2
    args.sections = tuple(dict.fromkeys(names))  # in the order given, each once
    return args


def plan(args: argparse.Namespace) -> str:
    lines = [f"gpu_check plan ({'quick' if args.quick else 'full'}, budget {BUDGET_S} s, "
             f"JSON to {args.out}):"]  # fmt: skip
    for name in args.sections:
        what, limit = SECTIONS[name]
        lines.append(f"  {name:<10} {what} (at most {limit} s)")
    return "\n".join(lines)


def run_section(name: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """One section in a subprocess; a crash or a time-out is a FAIL row of its own."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
        cmd += ["--worker-out", str(out), "--device", args.device, "--out", str(args.out)]
        cmd += ["--quick"] if args.quick else []
        try:
            done = subprocess.run(
                cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
            )
            rows = json.loads(out.read_text())["rows"] if out.exists() else None
            if rows is None:
                rows = [row(name, FAIL, f"worker exit {done.returncode}: {_tail(done)}")]
        except subprocess.TimeoutExpired as expired:
            rows = [row(name, FAIL, f"timed out after {timeout:.0f} s: {_tail(expired)}")]
    statuses = {r["status"] for r in rows}
    status = FAIL if FAIL in statuses else PASS if PASS in statuses else SKIP
    return {"status": status, "seconds": time.perf_counter() - started, "rows": rows}


def table(results: dict[str, dict[str, Any]]) -> str:
    """Every row, left-aligned: section, check, status, figures."""
    cells = [("section", "check", "status", "figures")] + [
        (name, r["check"], r["status"], r["figures"])
        for name, section in results.items()
        for r in section["rows"]
    ]
    widths = [max(len(str(c[i])) for c in cells) for i in range(3)]
    lines = ["  ".join(str(c[i]).ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len("figures"))
    return "\n".join(line.rstrip() for line in lines)


def worker(args: argparse.Namespace) -> int:
    """Run one section here and write its rows (an exception becomes one FAIL row)."""
    BENCH_DIRS[0] = args.out.parent
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{args.worker}_work_") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        try:
            rows = WORKERS[args.worker](args.quick, args.device, work)
        except Exception as err:  # noqa: BLE001 - reported as the section's FAIL row
            rows = [row(args.worker, FAIL, f"{type(err).__name__}: {err}"[:600])]
    args.worker_out.write_text(json.dumps({"rows": rows}, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    if args.dry_run:
        print(plan(args))
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: error: {NO_CUDA}", file=sys.stderr)
        return 2
    print(plan(args), flush=True)
    deadline = time.perf_counter() + BUDGET_S
    results = {}
    for name in args.sections:
        left = deadline - time.perf_counter()
        if left < MIN_START_S:
            results[name] = {"status": SKIP, "seconds": 0.0, "rows": [
                row(name, SKIP, f"not started: {left:.0f} s of the {BUDGET_S} s budget left")]}  # fmt: skip
        else:
            results[name] = run_section(name, args, min(SECTIONS[name][1], left))
        print(f"{name}: {results[name]['status']} ({results[name]['seconds']:.0f} s)", flush=True)
    from benchmarks._common import environment

    failed = [name for name, r in results.items() if r["status"] == FAIL]
    payload = {
        "benchmark": "gpu_check",
        "environment": environment(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "settings": {"quick": args.quick, "sections": list(args.sections), "device": args.device},
        "sections": results,
        "failed": failed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print("\n" + table(results) + f"\n\nJSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
