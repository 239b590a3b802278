"""The GPU check's speed sections: llama_1b step time, the refresh SVD, the 8-bit update, and
gnlorp-bench's small models. Every figure is set beside a baseline measured in the same process
on the same GPU, and every row carries the absolute figure too.

Each section is ``section_NAME(rows, *, quick, device, work)`` (see :mod:`benchmarks.gpu_check`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks.gpu_rows import FAIL, PASS, Rows, ratio, row


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], Any], device: Any, warmup: int, timed: int) -> float:
    """Median wall time of ``step`` over ``timed`` calls after ``warmup`` ones, the device
    synchronised around each call (so queued kernels count where they were launched)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(timed):
        began = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _peak_reset(device: Any) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: Any) -> int:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return 0


def _random_orthonormal(rows: int, cols: int, like: Any) -> Any:
    """A ``rows x cols`` matrix with orthonormal columns (rows >= cols), on ``like``'s device."""
    import torch

    gen = torch.Generator(device=like.device).manual_seed(0)
    noise = torch.randn(rows, cols, generator=gen, device=like.device, dtype=torch.float32)
    return torch.linalg.qr(noise).Q


@contextlib.contextmanager
def cheap_first_bases(optimizer: Any) -> Iterator[None]:
    """The warm-up step's bases are random orthonormal ones of the right shape, for ours and for
    galore-torch: a step between refreshes costs the same whatever basis it uses, and 168 exact
    SVDs would take the section's whole share (the ``svd`` section times a refresh)."""
    from galore_torch.galore_projector import GaLoreProjector

    from gnlorp_dist.optim.projection import projection_side

    def ours(projection: Any, grad_MN: Any, state: dict[str, Any]) -> Any:
        rows, cols = grad_MN.shape
        rank = projection.rank
        if projection_side(grad_MN.shape, projection.proj_type) == "right":
            return _random_orthonormal(cols, rank, grad_MN).T.contiguous().to(grad_MN.dtype)
        return _random_orthonormal(rows, rank, grad_MN).to(grad_MN.dtype)

    def theirs(self: Any, weights: Any, rank: int, type: str) -> Any:  # galore-torch's names
        rows, cols = weights.shape
        if type == "right":
            return _random_orthonormal(cols, rank, weights).T.contiguous().to(weights.dtype)
        return _random_orthonormal(rows, rank, weights).to(weights.dtype)

    with contextlib.ExitStack() as stack:
        if hasattr(optimizer, "compute_basis"):
            stack.enter_context(mock.patch.object(optimizer, "compute_basis", ours))
        stack.enter_context(mock.patch.object(GaLoreProjector, "get_orthogonal_matrix", theirs))
        yield


# -- llama_1b step time ---------------------------------------------------------------------------

LLAMA_1B, LLAMA_1B_BATCH, LLAMA_1B_SEQ = "llama_1b", 8, 512
LLAMA_1B_METHODS = ("adamw-fused", "galore-torch", "gradnormlorp", "gradnormlorp-8bit")


def _llama_1b_setup(method: str, device: Any) -> tuple[Any, Any]:
    import torch
    from galore_torch import GaLoreAdamW

    from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
    from gnlorp_dist.models import build_model, llama_config, model_spec

    spec = model_spec(LLAMA_1B)
    model = build_model(llama_config(LLAMA_1B), torch.bfloat16, seed=0, device=device)
    if method == "adamw-fused":
        fused = torch.device(device).type == "cuda"
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    if method.startswith("gradnormlorp"):
        model = apply_weight_norm(model)
    groups = projected_param_groups(model, spec.rank, spec.update_proj_gap, spec.scale)
    if method == "galore-torch":
        groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
        return model, GaLoreAdamW(groups, lr=spec.lr, no_deprecation_warning=True)
    bits = 8 if method.endswith("8bit") else 32
    return model, GradNormLoRPAdamW(groups, lr=spec.lr, bits=bits)


def section_llama_1b(rows: Rows, *, quick: bool, device: str, work: Path) -> None:
    """Pure bf16 (GaLore's single-GPU setting), between refreshes: ms per optimizer step of
    forward + backward + update, and the peak memory, each method against fused AdamW."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (LLAMA_1B_BATCH, LLAMA_1B_SEQ), generator=gen).to(device)
    results: dict[str, dict[str, float]] = {}
    for method in LLAMA_1B_METHODS:
        _peak_reset(device)
        model, optimizer = _llama_1b_setup(method, device)
        losses: list[Any] = []

        def step(model: Any = model, optimizer: Any = optimizer, losses: list = losses) -> None:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        with cheap_first_bases(optimizer):
            step()  # the step-0 refresh, with cheap bases
        seconds = median_seconds(step, device, warmup=1, timed=3 if quick else 8)
        finite = all(math.isfinite(float(x)) for x in losses)
        results[method] = {"seconds": seconds, "peak": _peak(device), "finite": finite}
        del model, optimizer, losses, step
    base = results["adamw-fused"]
    for method, r in results.items():
        tokens = LLAMA_1B_BATCH * LLAMA_1B_SEQ / r["seconds"]
        rows.append(
            row(
                f"{LLAMA_1B} bf16 {method}",
                PASS if r["finite"] else FAIL,
                f"{r['seconds'] * 1e3:.1f} ms/step ({tokens:,.0f} tok/s; "
                f"x{ratio(r['seconds'], base['seconds']):.2f} of fused AdamW"
                + (
                    f", x{ratio(r['seconds'], results['galore-torch']['seconds']):.2f} of "
                    "galore-torch"
                    if method.startswith("gradnormlorp")
                    else ""
                )
                + f"), peak {r['peak'] / 2**30:.2f} GiB (x{ratio(r['peak'], base['peak']):.2f})",
                seconds_per_step=r["seconds"],
                peak_bytes=r["peak"],
                ratio_to_fused_adamw=ratio(r["seconds"], base["seconds"]),
            )
        )


# -- the refresh SVD ------------------------------------------------------------------------------

SVD_SHAPE, SVD_RANK = (4096, 11008), 1024


def section_svd(rows: Rows, *, quick: bool, device: str, work: Path) -> None:
    """One refresh of a 7B MLP matrix (4096 x 11008) at the 7B recipe's rank: the exact SVD
    (GaLore's) against the randomized range finder, and the subspace the latter finds."""
    import torch

    from gnlorp_dist.optim.projection import compute_projection, projection_side, subspace_error

    gen = torch.Generator(device=device).manual_seed(0)
    rows_, cols = SVD_SHAPE
    # A gradient-like spectrum: a decaying low-rank part plus noise.
    decay = torch.logspace(0, -3, 2 * SVD_RANK, device=device)
    left = torch.randn(rows_, 2 * SVD_RANK, generator=gen, device=device) * decay
    grad = left @ torch.randn(2 * SVD_RANK, cols, generator=gen, device=device) / cols**0.5
    grad += 1e-4 * torch.randn(rows_, cols, generator=gen, device=device)
    side = projection_side(grad.shape, "std")
    bases: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for method, timed in (("svd", 1 if quick else 2), ("randomized", 2 if quick else 4)):

        def refresh(method: str = method) -> None:
            rng = torch.Generator(device=device).manual_seed(0)
            bases[method] = compute_projection(grad, SVD_RANK, side, method=method, generator=rng)

        seconds[method] = median_seconds(refresh, device, warmup=1, timed=timed)
    error = subspace_error(bases["svd"], bases["randomized"], side)
    shape = f"{rows_}x{cols} rank {SVD_RANK}"
    rows.append(
        row(f"refresh exact SVD {shape}", PASS, f"{seconds['svd']:.3f} s", seconds=seconds["svd"])
    )
    rows.append(
        row(
            f"refresh randomized {shape}",
            PASS if error < 0.5 else FAIL,
            f"{seconds['randomized']:.3f} s (x{ratio(seconds['randomized'], seconds['svd']):.3f} "
            f"of exact); subspace distance to exact {error:.3f}",
            seconds=seconds["randomized"],
            ratio_to_exact=ratio(seconds["randomized"], seconds["svd"]),
            subspace_error=error,
        )
    )


# -- the 8-bit update -----------------------------------------------------------------------------

EIGHTBIT_SHAPES = [(4096, 4096)] * 4 + [(4096, 11008)] * 3  # one 7B layer's matrices


def _eightbit_optimizers(params: list[Any], device: Any) -> dict[str, Callable[[], Any]]:
    import bitsandbytes as bnb
    import torch

    from gnlorp_dist import GradNormLoRPAdamW

    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    rank = min(1024, *(min(p.shape) // 4 for p in params))
    return {
        "torch AdamW fp32": lambda: torch.optim.AdamW(
            params, fused=torch.device(device).type == "cuda", **kwargs
        ),
        "bnb AdamW8bit": lambda: bnb.optim.AdamW8bit(params, **kwargs),
        "ours dense 8-bit": lambda: GradNormLoRPAdamW(params, bits=8, **kwargs),
        "ours dense fp32": lambda: GradNormLoRPAdamW(params, bits=32, **kwargs),
        f"ours projected r{rank} 8-bit": lambda: GradNormLoRPAdamW(
            [
                {
                    "params": params,
                    "rank": rank,
                    "update_proj_gap": 10**6,
                    "scale": 0.25,
                    "proj_type": "std",
                }
            ],
            bits=8,
            **kwargs,
        ),
    }


def section_eightbit(rows: Rows, *, quick: bool, device: str, work: Path) -> None:
    """ms per ``step()`` on one 7B layer's matrices (fp32 parameters, fixed gradients): our
    8-bit dense update (bitsandbytes' block-wise kernels, chunked) against bitsandbytes'
    ``AdamW8bit`` and torch's fused fp32 AdamW; the projected 8-bit update beside them."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen, device=device)) for s in EIGHTBIT_SHAPES
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-2
    timings: dict[str, float] = {}
    for name, build in _eightbit_optimizers(params, device).items():
        _peak_reset(device)
        optimizer = build()
        with cheap_first_bases(optimizer):
            optimizer.step()  # states created (and the projected group's one refresh)
        timings[name] = median_seconds(optimizer.step, device, warmup=1, timed=3 if quick else 10)
        del optimizer
    numel = sum(p.numel() for p in params)
    for name, seconds in timings.items():
        rows.append(
            row(
                f"update {name}",
                PASS if math.isfinite(seconds) else FAIL,
                f"{seconds * 1e3:.2f} ms/step on {numel / 1e6:.0f}M parameters "
                f"(x{ratio(seconds, timings['bnb AdamW8bit']):.2f} of bnb AdamW8bit, "
                f"x{ratio(seconds, timings['torch AdamW fp32']):.2f} of torch AdamW fp32)",
                seconds=seconds,
                ratio_to_bnb=ratio(seconds, timings["bnb AdamW8bit"]),
            )
        )


def use_tiny_shapes() -> None:
    """Development (``gpu_check.py --tiny``): shapes a CPU runs in seconds, so that every line
    of these sections runs in the CPU suite. Not a check of anything a GPU would show."""
    global LLAMA_1B, LLAMA_1B_BATCH, LLAMA_1B_SEQ, SVD_SHAPE, SVD_RANK, EIGHTBIT_SHAPES
    global BENCH_MODELS, BENCH_METHODS, BENCH_SEQ_LEN, BENCH_BATCH, BENCH_STEPS
    LLAMA_1B, LLAMA_1B_BATCH, LLAMA_1B_SEQ = "llama_nano", 2, 32
    SVD_SHAPE, SVD_RANK = (96, 160), 8
    EIGHTBIT_SHAPES = [(64, 96)] * 2
    BENCH_MODELS, BENCH_METHODS = ("llama_nano",), ("adamw", "gradnormlorp8bit")
    BENCH_SEQ_LEN, BENCH_BATCH, BENCH_STEPS = 32, 2, {False: 3, True: 3}


# -- gnlorp-bench on small models -----------------------------------------------------------------

BENCH_MODELS = ("llama_60m", "llama_130m")
BENCH_METHODS = ("adamw", "adamw8bit", "galore", "gradnormlorp", "gradnormlorp8bit")
BENCH_SEQ_LEN, BENCH_BATCH = 256, 8
BENCH_STEPS = {False: 30, True: 10}  # keyed by quick


def section_bench(rows: Rows, *, quick: bool, device: str, work: Path) -> None:
    """gnlorp-bench's runner and methods on the GPU: tokens/s and peak memory vs adamw."""
    import torch

    from gnlorp_dist.bench import BenchConfig, run

    for model in BENCH_MODELS:
        config = BenchConfig(
            methods=BENCH_METHODS, model=model, steps=BENCH_STEPS[quick],
            batch_size=BENCH_BATCH, seq_len=BENCH_SEQ_LEN, eval_batches=2, loss_window=5,
            log_every=max(1, BENCH_STEPS[quick] // 2), device=device,
            threads=torch.get_num_threads(), output_dir=str(work / f"bench_{model}"),
        )  # fmt: skip
        payload = run(config)
        for method, r in payload["methods"].items():
            loss = r["final_train_loss"]
            ok = r["diverged_at"] is None and loss is not None and math.isfinite(loss)
            memory = r.get("memory") or {}
            rows.append(
                row(
                    f"bench {model} {method}",
                    PASS if ok else FAIL,
                    f"{r.get('tokens_per_s', math.nan):,.0f} tok/s "
                    f"(x{r.get('tokens_per_s_ratio_to_adamw', math.nan):.2f}), "
                    f"peak {memory.get('peak_bytes', 0) / 2**20:,.0f} MiB "
                    f"(x{r.get('peak_memory_ratio_to_adamw', math.nan):.2f}), loss {loss:.3f}",
                    final_train_loss=loss,
                    memory=memory,
                    tokens_per_s=r.get("tokens_per_s"),
                    tokens_per_s_ratio_to_adamw=r.get("tokens_per_s_ratio_to_adamw"),
                    peak_memory_ratio_to_adamw=r.get("peak_memory_ratio_to_adamw"),
                )
            )
