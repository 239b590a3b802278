"""The GPU check's correctness and memory sections: the gpu tests, the 7B recipe's peak, ZeRO.

Each section is ``section_NAME(rows, *, quick, device, work)`` and appends its rows to ``rows``
(see :mod:`benchmarks.gpu_rows`); :mod:`benchmarks.gpu_check` runs each in its own process.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from benchmarks.gpu_rows import FAIL, PASS, SKIP, Rows, row

REPO = Path(__file__).resolve().parents[1]

# -- tests ----------------------------------------------------------------------------------------


def section_tests(rows: Rows, *, quick: bool, device: str, work: Path) -> None:
    """The gpu-marked tests, one row per test from pytest's JUnit XML. A skipped test is a SKIP
    row (so the section and the check are not a pass): on the GPU machine every one must run."""
    junit = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-rs"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={junit}"]
    # Output goes to the section's log as it comes; the worker's process group bounds its time.
    done = subprocess.run(cmd, cwd=REPO, check=False)
    if not junit.exists():
        rows.append(row("pytest -m gpu tests/gpu", FAIL, f"rc {done.returncode}, no JUnit XML"))
        return
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        seconds = float(case.get("time", 0.0))
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            message = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
            rows.append(row(name, FAIL, f"{seconds:.1f} s: {message}", seconds=seconds))
        elif skipped is not None:
            rows.append(row(name, SKIP, f"skipped: {skipped.get('message', '')[:200]}"))
        else:
            rows.append(row(name, PASS, f"{seconds:.1f} s", seconds=seconds))
    if not rows:
        rows.append(row("pytest -m gpu tests/gpu", FAIL, f"rc {done.returncode}, no test ran"))


# -- the single-GPU 7B recipe ---------------------------------------------------------------------

RECIPE_7B = dict(
    model="llama_7b", optimizer="gradnormlorp", dtype="bf16", bits=8, per_layer=True, rank=1024,
    update_proj_gap=500, scale=0.25, proj_bits=8, lr=0.005, grad_clip=1.0,
    activation_checkpointing=True, batch_size=16, seq_len=256,
)  # fmt: skip
"""``launch/single_gpu_7b.sh``'s defaults (tests/unit/test_gpu_check.py holds them equal)."""
RECIPE_TEXT_CHARS = 400_000
"""A small local text: tokenising the whole corpus is not the point."""
PAPER_7B_GB = 20.07  # GradNormLoRP paper, LLaMA 7B on one GPU (8-bit, per-layer)
GALORE_7B_GB = 22.72  # GaLore paper, same setting
ESTIMATE_TOLERANCE = 0.15
"""The measured peak allocated may differ from the estimate by this fraction: the estimator
counts live tensors, not cuBLAS/cuSOLVER workspaces or the allocator's 512-byte rounding."""


def recipe_7b_config(device: str, data: str, output_dir: str, steps: int) -> Any:
    """The recipe as a RunConfig that saves nothing (save_every 0; the section never reaches
    the end-of-run save)."""
    from gnlorp_dist.training.config import RunConfig

    return RunConfig(
        **RECIPE_7B, max_steps=steps, warmup_steps=0, device=device, data=data,
        output_dir=output_dir, save_every=0, resume="never", progress=False, eval_batches=1,
    )  # fmt: skip


def recipe_7b_estimate() -> Any:
    """``gnlorp-memory`` with the recipe's settings (the step 0 refresh included)."""
    from gnlorp_dist.memory import MemoryConfig, estimate_memory

    r = RECIPE_7B
    return estimate_memory(
        MemoryConfig(
            model=r["model"],
            optimizer=r["optimizer"],
            bits=r["bits"],
            rank=r["rank"],
            per_layer=r["per_layer"],
            tokens=r["batch_size"] * r["seq_len"],
            seq_len=r["seq_len"],
            dtype=r["dtype"],
            proj_bits=r["proj_bits"],
            activation_checkpointing=r["activation_checkpointing"],
        )  # fmt: skip
    )


def section_recipe_7b(rows: Rows, *, quick: bool, device: str, work: Path) -> None:
    """prepare() + train_step, not train(): the end of a run saves a 14 GB merged model."""
    import torch

    from gnlorp_dist.data.corpus import shakespeare_documents
    from gnlorp_dist.device import memory_stats, to_device
    from gnlorp_dist.training.run import prepare
    from gnlorp_dist.training.steps import train_step

    text = work / "text.txt"
    text.write_text(shakespeare_documents()[0][:RECIPE_TEXT_CHARS])
    started = time.perf_counter()
    run = prepare(recipe_7b_config(device, str(text), str(work / "run"), 2 if quick else 3))
    built_s = time.perf_counter() - started
    c = run.config
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(run.device)
    losses, step_s = [], []
    for _ in range(c.max_steps):
        batch = to_device(run.data.train.next_batch(), run.device)
        micro = list(batch.view(c.grad_accum, c.batch_size, c.seq_len))
        began = time.perf_counter()
        stats = train_step(
            run.forward_model, run.optimizer, run.scheduler, micro, c.grad_clip, True
        )
        losses.append(stats.loss)  # read on the host: the step has finished
        step_s.append(time.perf_counter() - began)
    measured = memory_stats(run.device)
    estimate = recipe_7b_estimate()
    finite = all(math.isfinite(x) for x in losses)
    rows.append(
        row(
            "7B recipe: steps",
            PASS if finite else FAIL,
            f"{c.max_steps} steps of {c.batch_size}x{c.seq_len} tokens, loss "
            f"{' '.join(f'{x:.3f}' for x in losses)}; step 1 (refresh of every basis) "
            f"{step_s[0]:.1f} s, then {sum(step_s[1:]) / max(1, len(step_s) - 1):.2f} s/step; "
            f"model built in {built_s:.0f} s",
            losses=losses,
            step_s=step_s,
            build_s=built_s,
        )
    )
    if not measured:
        rows.append(row("7B recipe: peak vs estimate", SKIP, f"no CUDA memory stats on {device}"))
        return
    peak = measured["max_memory_allocated"]
    ratio = peak / estimate.total_bytes
    rows.append(
        row(
            "7B recipe: peak vs estimate",
            PASS if abs(ratio - 1) <= ESTIMATE_TOLERANCE else FAIL,
            f"measured {peak / 2**30:.2f} GiB allocated ({peak / 1e9:.2f} GB), "
            f"{measured['max_memory_reserved'] / 2**30:.2f} GiB reserved; estimate "
            f"{estimate.total_bytes / 2**30:.2f} GiB (x{ratio:.3f}); paper {PAPER_7B_GB} GB, "
            f"GaLore {GALORE_7B_GB} GB",
            **measured,
            estimate_bytes=estimate.total_bytes,
            ratio_to_estimate=ratio,
            paper_gb=PAPER_7B_GB,
            galore_gb=GALORE_7B_GB,
        )
    )


def use_tiny_shapes() -> None:
    """Development (``gpu_check.py --tiny``): llama_nano instead of 7B, so that every line of
    these sections runs on a CPU in seconds. Not a check of anything a GPU would show."""
    global RECIPE_7B, RECIPE_TEXT_CHARS
    RECIPE_7B = {**RECIPE_7B, "model": "llama_nano", "rank": 8, "batch_size": 2, "seq_len": 32}
    RECIPE_TEXT_CHARS = 20_000


# -- DeepSpeed ZeRO on one GPU --------------------------------------------------------------------

DS_STEPS = {False: 10, True: 6}
DS_GAP = {False: 5, True: 3}
DS_TOLERANCE = 1e-4  # fp32, TF32 off, eager attention: summation order alone (CPU: ~4e-5)


def tf32_off() -> None:
    """TF32 off for the rest of this process, through the API torch >= 2.9 wants (mixing it with
    the legacy ``allow_tf32`` flags raises there)."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(cudnn, "fp32_precision"):
        matmul.fp32_precision = "ieee"
        cudnn.fp32_precision = "ieee"
    else:  # torch < 2.9: the legacy flags are the only ones
        matmul.allow_tf32 = False
        cudnn.allow_tf32 = False


def _ds_model(device: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gnlorp_dist import apply_weight_norm

    llama = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=347, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
        attn_implementation="eager",  # SDPA's GPU kernels would pick other reductions per run
    )  # fmt: skip  # an odd intermediate size: ZeRO cuts some matrices inside a row
    torch.manual_seed(11)
    return apply_weight_norm(LlamaForCausalLM(llama)).to(device)


def _ds_batch(step: int, device: Any) -> Any:
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, 512, (4, 1), generator=gen)
    stride = torch.randint(1, 4, (4, 1), generator=gen)  # learnable sequences: the loss falls
    return ((start + stride * torch.arange(32)) % 512).to(device)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def section_deepspeed(rows: Rows, *, quick: bool, device: str, work: Path) -> None:
    """ZeRO 2 and 3 at world size 1 over nccl (gloo on the hidden ``--device cpu``) against
    the same optimizer without DeepSpeed."""
    import torch

    from gnlorp_dist.device import resolve_device

    target = resolve_device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
        tf32_off()
    else:  # before deepspeed is first imported: it picks its accelerator then
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from gnlorp_dist import GradNormLoRPAdamW, projected_param_groups
    from gnlorp_dist.integrations.deepspeed import check_deepspeed_config

    if target.type == "cpu":  # on CUDA, reading this probes every op builder with compilers
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a CPU JIT build
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(target.index or 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if target.type == "cuda" else "gloo")
    steps, gap = DS_STEPS[quick], DS_GAP[quick]

    def optimizer_for(model: Any) -> Any:
        groups = projected_param_groups(model, rank=8, update_proj_gap=gap, scale=0.25)
        return GradNormLoRPAdamW(groups, lr=1e-2, weight_decay=0.01)

    model = _ds_model(target)
    initial = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    reference = optimizer_for(model)
    for step in range(steps):
        reference.zero_grad()
        ids = _ds_batch(step, target)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        reference.step()
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    moved = float((expected - initial).norm() / initial.norm())
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
            )
        )
        del engine, optimizer, model
    torch.distributed.destroy_process_group()
