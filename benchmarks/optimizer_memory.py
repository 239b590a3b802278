"""Exact training-state bytes of adamw, galore, gradnormlorp and galore-torch on LLaMA shapes.

For every model and method the script reports the bytes of the weights, the gradients, the
optimizer states and the projection matrices. Nothing is a formula: the model is built on the
meta device (real modules, real weight-norm surgery, real parameter groups, no memory), and every
distinct (parameter group, shape) pair is then materialised once on the CPU, given a random
gradient, and stepped once by the real optimizer; the bytes of the tensors the optimizer holds
afterwards are multiplied by the number of parameters of that shape in that group. State size
depends only on shape, dtype and group settings, so this equals a whole-model step; the
``--cross-check`` models are also stepped whole (forward, backward, step) and must agree to the
byte.

    python -m benchmarks.optimizer_memory                    # llama_60m ... llama_1b, bf16
    python -m benchmarks.optimizer_memory --models llama_60m --dtype fp32
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlamaConfig

from gnlorp_dist.bench.harness import (
    DTYPES,
    add_output_args,
    environment,
    format_table,
    gib,
    write_json,
)
from gnlorp_dist.bench.methods import (
    REFERENCE_METHODS,
    make_optimizer,
    param_groups,
    prepare_model,
    spec_hyper,
)
from gnlorp_dist.memory.bytes import optimizer_state_bytes
from gnlorp_dist.models import (
    ModelSpec,
    build_model,
    build_model_on_meta,
    known_model_names,
    llama_config,
    model_spec,
)

NAME = "optimizer_memory"
DEFAULT_MODELS = ("llama_60m", "llama_130m", "llama_350m", "llama_1b")
DEFAULT_CROSS_CHECK = ("llama_60m",)
CROSS_CHECK_TOKENS = 32

# The paper's Table 2 "memory estimates for parameters and optimizer states in BF16", in its
# unit "G" (GradNormLoRP paper, AAAI 2025). Its 1B row lists r=512; the spec (and this script)
# uses GaLore's r=1024. Printed next to our measured weights + states for orientation only.
PAPER_TABLE2_WEIGHTS_PLUS_STATES_G = {
    "llama_60m": {"adamw": 0.35, "galore": 0.23, "gradnormlorp": 0.17},
    "llama_130m": {"adamw": 0.8, "galore": 0.54, "gradnormlorp": 0.47},
    "llama_350m": {"adamw": 2.21, "galore": 1.47, "gradnormlorp": 1.19},
    "llama_1b": {"adamw": 8.03, "galore": 4.69, "gradnormlorp": 3.81},
}


@dataclass(frozen=True)
class ShapeKey:
    """What the optimizer state of one parameter depends on: the optimizer, its group settings,
    the parameter's shape and dtype. Equal keys give equal bytes, so each is measured once."""

    optimizer: str
    """``adamw``, ``gnlorp`` (GradNormLoRPAdamW: galore and gradnormlorp) or ``galore-torch``."""
    options: tuple[tuple[str, Any], ...]
    """The group's settings (rank, update_proj_gap, scale, proj_type), empty for dense groups."""
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ShapeBytes:
    """Bytes one parameter of a ``ShapeKey`` costs, measured after one real step."""

    weight: int
    grad: int
    state: int
    proj: int


@dataclass
class Inventory:
    """The parameters a method trains, from the meta-device model: counts per ``ShapeKey``."""

    method: str
    num_parameters: int
    meta_weight_bytes: int
    """Bytes of every parameter of the meta model (the materialised ones must sum to this)."""
    frozen_weight_bytes: int
    entries: list[tuple[int, ShapeKey, int]]
    """``(group index, key, count)`` for every distinct shape of every group."""


def _optimizer_name(method: str) -> str:
    return "gnlorp" if method in ("galore", "gradnormlorp") else method


def _method_of(optimizer: str) -> str:
    return "galore" if optimizer == "gnlorp" else optimizer


def inventory(config: LlamaConfig, spec: ModelSpec, method: str, dtype: torch.dtype) -> Inventory:
    """Real modules, weight-norm surgery and parameter groups, on the meta device (no memory)."""
    model = prepare_model(build_model_on_meta(config).to(dtype), method)
    groups = param_groups(model, method, spec_hyper(spec))
    in_groups = {id(p) for g in groups for p in g["params"]}
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    entries = []
    for index, group in enumerate(groups):
        options = tuple(sorted((k, v) for k, v in group.items() if k not in _NOT_OPTIONS))
        counts = Counter((tuple(p.shape), p.dtype) for p in group["params"])
        for (shape, param_dtype), count in sorted(counts.items(), key=lambda kv: kv[0][0]):
            assert param_dtype == dtype, f"{method}: a {param_dtype} parameter in a {dtype} model"
            key = ShapeKey(_optimizer_name(method), options, shape, dtype_name)
            entries.append((index, key, count))
    return Inventory(
        method=method,
        num_parameters=sum(p.numel() for p in model.parameters()),
        meta_weight_bytes=sum(p.nbytes for p in model.parameters()),
        frozen_weight_bytes=sum(p.nbytes for p in model.parameters() if id(p) not in in_groups),
        entries=entries,
    )


_NOT_OPTIONS = ("params", "param_names")


OPTIMIZER_HYPER = spec_hyper(model_spec("llama_60m"))
"""lr, betas, eps and weight decay of every optimizer (each group carries its rank, gap and
scale: the same for every model)."""


def state_and_projection_bytes(
    optimizer: torch.optim.Optimizer, param: torch.Tensor
) -> tuple[int, int]:
    """``(state bytes, projection-matrix bytes)`` that ``optimizer`` holds for ``param``: every
    tensor of its state (moments, and ``torch.optim.AdamW``'s 4-byte ``step`` tensor) apart
    from the projection matrices, counted separately (:mod:`gnlorp_dist.memory.bytes`)."""
    counts = optimizer_state_bytes(optimizer, [param])
    return counts["total"] - counts["projection"], counts["projection"]


def measure_shape(key: ShapeKey) -> ShapeBytes:
    """Materialise one parameter of ``key``'s shape, give it a random gradient, take one real
    optimizer step, and count the bytes of the tensors the optimizer then holds for it."""
    dtype = DTYPES[key.dtype]
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(key.shape, generator=generator).to(dtype))
    param.grad = torch.randn(key.shape, generator=generator).to(dtype)
    optimizer = make_optimizer(
        _method_of(key.optimizer), [{"params": [param], **dict(key.options)}], OPTIMIZER_HYPER
    )
    optimizer.step()
    state, proj = state_and_projection_bytes(optimizer, param)
    return ShapeBytes(param.nbytes, param.grad.nbytes, state, proj)


def _cost(key: ShapeKey) -> float:
    """Rough cost, to start the slow measurements (big projected matrices) first."""
    numel = 1
    for size in key.shape:
        numel *= size
    return numel * dict(key.options).get("rank", 1)


def measure_all(keys: set[ShapeKey], workers: int) -> dict[ShapeKey, ShapeBytes]:
    """``measure_shape`` for every key, in ``workers`` processes (1: in this process)."""
    ordered = sorted(keys, key=_cost, reverse=True)
    if workers <= 1 or len(ordered) <= 1:
        return {key: measure_shape(key) for key in ordered}
    # bf16 matmuls run on one thread on CPUs without native bf16: processes, one thread each.
    # spawn, not fork: forking a process whose OpenMP pool has started can hang the child.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(max(1, torch.get_num_threads() // workers),)) as pool:  # fmt: skip
        return dict(zip(ordered, pool.map(measure_shape, ordered)))


BYTE_KEYS = ("weight_bytes", "gradient_bytes", "optimizer_state_bytes", "projection_bytes")


def totals(inv: Inventory, measured: dict[ShapeKey, ShapeBytes]) -> dict[str, Any]:
    """The method's bytes: each shape's measured bytes times its count."""
    rows = [(index, key, count, measured[key]) for index, key, count in inv.entries]
    weight = sum(count * m.weight for _, _, count, m in rows) + inv.frozen_weight_bytes
    assert weight == inv.meta_weight_bytes, f"{inv.method}: {weight} != {inv.meta_weight_bytes}"
    result = {
        "num_parameters": inv.num_parameters,
        "num_projected_matrices": sum(c for _, k, c, _ in rows if "rank" in dict(k.options)),
        "weight_bytes": weight,
        "gradient_bytes": sum(count * m.grad for _, _, count, m in rows),
        "optimizer_state_bytes": sum(count * m.state for _, _, count, m in rows),
        "projection_bytes": sum(count * m.proj for _, _, count, m in rows),
    }
    result["total_bytes"] = sum(result[k] for k in BYTE_KEYS)
    result["weights_plus_states_bytes"] = result["weight_bytes"] + result["optimizer_state_bytes"]
    result["shapes"] = [
        {
            "group": index,
            "projected": "rank" in dict(key.options),
            "shape": list(key.shape),
            "count": count,
            "weight_bytes": m.weight,
            "grad_bytes": m.grad,
            "state_bytes": m.state,
            "proj_bytes": m.proj,
        }
        for index, key, count, m in rows
    ]
    return result


def whole_model_bytes(
    config: LlamaConfig, spec: ModelSpec, method: str, dtype: torch.dtype
) -> dict[str, int]:
    """The four byte counts from ONE real training step of the whole materialised model."""
    model = prepare_model(build_model(config, dtype=dtype, seed=0), method)
    hp = spec_hyper(spec)
    groups = param_groups(model, method, hp)
    optimizer = make_optimizer(method, groups, hp)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, CROSS_CHECK_TOKENS), generator=generator)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    params = [p for g in groups for p in g["params"]]
    state = proj = 0
    for param in params:
        s, p = state_and_projection_bytes(optimizer, param)
        state, proj = state + s, proj + p
    return {
        "weight_bytes": sum(p.nbytes for p in model.parameters()),
        "gradient_bytes": sum(p.grad.nbytes for p in params if p.grad is not None),
        "optimizer_state_bytes": state,
        "projection_bytes": proj,
    }


def model_config(name: str, layers: int | None) -> LlamaConfig:
    config = llama_config(name)
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def run(args: argparse.Namespace, methods: list[str]) -> list[dict[str, Any]]:
    dtype = DTYPES[args.dtype]
    plans = []
    for name in args.models:
        spec, config = model_spec(name), model_config(name, args.layers)
        plans.append((name, spec, config, {m: inventory(config, spec, m, dtype) for m in methods}))
    keys = {key for *_, invs in plans for inv in invs.values() for _, key, _ in inv.entries}
    measured = measure_all(keys, args.workers)

    results = []
    for name, spec, config, invs in plans:
        out: dict[str, Any] = {
            "model": name,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "rank": spec.rank,
            "update_proj_gap": spec.update_proj_gap,
            "scale": spec.scale,
            "methods": {m: totals(inv, measured) for m, inv in invs.items()},
        }
        adamw_states = out["methods"].get("adamw", {}).get("optimizer_state_bytes")
        for result in out["methods"].values():
            result["state_ratio_to_adamw"] = (
                result["optimizer_state_bytes"] / adamw_states if adamw_states else None
            )
        if "galore" in out["methods"] and "galore-torch" in out["methods"]:
            ours, theirs = out["methods"]["galore"], out["methods"]["galore-torch"]
            for key in BYTE_KEYS:
                assert ours[key] == theirs[key], (
                    f"{name}: galore and galore-torch disagree on {key}: "
                    f"{ours[key]} != {theirs[key]}"
                )
        if name in args.cross_check:
            out["cross_check"] = cross_check(name, spec, methods, dtype, args, measured)
        results.append(out)
    return results


def cross_check(
    name: str,
    spec: ModelSpec,
    methods: list[str],
    dtype: torch.dtype,
    args: argparse.Namespace,
    measured: dict[ShapeKey, ShapeBytes],
) -> dict[str, Any]:
    """Step the whole model (with ``--cross-check-layers`` layers: every distinct shape, fewer
    copies) and require the bytes the per-shape measurements predict for it, to the byte."""
    config = model_config(name, args.cross_check_layers)
    out: dict[str, Any] = {"num_hidden_layers": config.num_hidden_layers, "methods": {}}
    for method in methods:
        predicted = totals(inventory(config, spec, method, dtype), measured)
        predicted = {k: predicted[k] for k in BYTE_KEYS}
        whole = whole_model_bytes(config, spec, method, dtype)
        assert whole == predicted, f"{name}/{method}: whole-model {whole} != per-shape {predicted}"
        out["methods"][method] = whole
    return out


def label(result: dict[str, Any]) -> str:
    """The model name, marked with its layer count where ``--layers`` changed it."""
    name = result["model"]
    if result["num_hidden_layers"] != model_spec(name).num_layers:
        return f"{name}[{result['num_hidden_layers']}L]"
    return name


def tables(results: list[dict[str, Any]], dtype_name: str) -> str:
    exact_rows, gib_rows = [], []
    for result in results:
        model = label(result)
        paper = PAPER_TABLE2_WEIGHTS_PLUS_STATES_G.get(result["model"], {})
        for method, r in result["methods"].items():
            exact_rows.append(
                [model, method, *(f"{r[k]:,}" for k in BYTE_KEYS), f"{r['total_bytes']:,}"]
            )
            ratio = r["state_ratio_to_adamw"]
            paper_value = paper.get(method)
            gib_rows.append(
                [
                    model,
                    method,
                    *(f"{gib(r[k]):.3f}" for k in BYTE_KEYS),
                    f"{gib(r['total_bytes']):.3f}",
                    "-" if ratio is None else f"{ratio:.3f}",
                    f"{r['weights_plus_states_bytes'] / 1e9:.2f}",
                    "-" if paper_value is None else f"{paper_value:.2f}",
                ]
            )
    exact = format_table(
        ["model", "method", "weights B", "grads B", "opt states B", "proj B", "total B"],
        exact_rows,
    )
    approx = format_table(
        [
            "model",
            "method",
            "weights",
            "grads",
            "states",
            "proj",
            "total",
            "states/adamw",
            "w+s GB",
            "paper GB",
        ],
        gib_rows,
    )
    return (
        f"Exact bytes ({dtype_name} weights), one real optimizer step per distinct shape:\n"
        f"{exact}\n\nThe same in GiB; states/adamw = optimizer-state bytes / adamw's; "
        "w+s GB = (weights + states) / 1e9 next to the paper's Table 2 (BF16 estimate):\n"
        f"{approx}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        choices=known_model_names(),
        help="model shapes to measure (default: %(default)s)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(REFERENCE_METHODS),
        choices=REFERENCE_METHODS,
        help="methods to measure (default: all)",
    )
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="weight dtype")
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="override the number of decoder layers (quick runs; totals then differ from the spec)",
    )
    parser.add_argument(
        "--cross-check",
        nargs="*",
        default=list(DEFAULT_CROSS_CHECK),
        metavar="MODEL",
        help="models also stepped whole to confirm the per-shape totals byte for byte "
        "(default: %(default)s; pass the flag alone for none)",
    )
    parser.add_argument(
        "--cross-check-layers",
        type=int,
        default=2,
        help="decoder layers of the cross-checked whole model (default: %(default)s; every "
        "distinct shape is there with 2)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes measuring shapes in parallel (default: %(default)s)",
    )
    add_output_args(parser, NAME)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    for flag in ("layers", "cross_check_layers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value} must be >= 1")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be >= 1")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    methods = list(args.methods)
    if "galore-torch" in methods:
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            print("galore-torch is not installed (pip install galore-torch==1.0); skipping it")
            methods.remove("galore-torch")
    started = time.perf_counter()
    results = run(args, methods)
    payload = {
        "benchmark": NAME,
        "environment": environment(),
        "settings": {
            "dtype": args.dtype,
            "models": list(args.models),
            "methods": methods,
            "layers_override": args.layers,
            "cross_check": [n for n in args.models if n in args.cross_check],
            "cross_check_layers": args.cross_check_layers,
            "workers": args.workers,
            "threads": torch.get_num_threads(),
            "measurement": MEASUREMENT_NOTE,
        },
        "paper_table2_weights_plus_states_G": PAPER_TABLE2_WEIGHTS_PLUS_STATES_G,
        "results": {r["model"]: r for r in results},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(tables(results, args.dtype))
    for result in results:
        if "cross_check" in result:
            check = result["cross_check"]
            print(
                f"\ncross-check {result['model']} ({check['num_hidden_layers']} layers): one "
                "whole-model forward/backward/step gives exactly the per-shape bytes for "
                + ", ".join(check["methods"])
            )
    path = write_json(args.json, payload)
    print(f"\nwrote {path} ({payload['seconds']} s)")
    return payload


MEASUREMENT_NOTE = (
    "model built on the meta device (real modules, weight-norm surgery, parameter groups); each "
    "distinct (optimizer, group settings, shape, dtype) stepped once on the CPU with a random "
    "gradient by the real optimizer; the bytes of the tensors in optimizer.state multiplied by "
    "the count of that shape. optimizer states = every state tensor except the projection matrix "
    "(torch AdamW's 4-byte step tensors included; the projected optimizers keep step as a Python "
    "int). galore and gradnormlorp share GradNormLoRPAdamW measurements of equal keys."
)


if __name__ == "__main__":
    main()
