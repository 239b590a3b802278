"""Exact training-state bytes of a method on a LLaMA shape, one real optimizer step per distinct
parameter shape (``python -m benchmarks.optimizer_memory``).

Nothing is a formula: the model is built on the meta device (real modules, real weight-norm
surgery, real parameter groups, no memory; :func:`inventory`), and every distinct (optimizer,
group settings, shape, dtype) :class:`ShapeKey` is then materialised once on the CPU, given a
random gradient and stepped once by the real optimizer (:func:`measure_shape`); the bytes of the
tensors the optimizer then holds are multiplied by the number of parameters of that shape in
that group (:func:`totals`). State size depends only on shape, dtype and group settings, so this
equals a whole-model step; :func:`cross_check` steps the whole model and requires it, to the byte.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gnlorp_dist.bench.harness import DTYPES, format_table, gib
from gnlorp_dist.bench.methods import make_optimizer, param_groups, prepare_model, spec_hyper
from gnlorp_dist.memory.bytes import optimizer_state_bytes
from gnlorp_dist.models import ModelSpec, build_model, build_model_on_meta, llama_config, model_spec

if TYPE_CHECKING:
    from transformers import LlamaConfig

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

MEASUREMENT_NOTE = (
    "model built on the meta device (real modules, weight-norm surgery, parameter groups); each "
    "distinct (optimizer, group settings, shape, dtype) stepped once on the CPU with a random "
    "gradient by the real optimizer; the bytes of the tensors in optimizer.state multiplied by "
    "the count of that shape. optimizer states = every state tensor except the projection matrix "
    "(torch AdamW's 4-byte step tensors included; the projected optimizers keep step as a Python "
    "int). galore and gradnormlorp share GradNormLoRPAdamW measurements of equal keys."
)

BYTE_KEYS = ("weight_bytes", "gradient_bytes", "optimizer_state_bytes", "projection_bytes")


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


_NOT_OPTIONS = ("params", "param_names")


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


def _shape_rows(rows: list[tuple[int, ShapeKey, int, ShapeBytes]]) -> list[dict[str, Any]]:
    return [
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
    result["shapes"] = _shape_rows(rows)
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
    """The named LLaMA's config, with ``layers`` decoder layers when given."""
    config = llama_config(name)
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def _model_result(name, spec, config, invs, measured) -> dict[str, Any]:
    """One model's record: its shape, and every method's bytes with the ratio to adamw's."""
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
                f"{name}: galore and galore-torch disagree on {key}: {ours[key]} != {theirs[key]}"
            )
    return out


def run(
    models: Sequence[str], methods: list[str], dtype_name: str, *, layers: int | None,
    workers: int, cross_check_models: Sequence[str], cross_check_layers: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every model's record (:func:`_model_result`), with a whole-model cross-check for those in
    ``cross_check_models`` (stepped with ``cross_check_layers`` layers)."""
    dtype = DTYPES[dtype_name]
    plans = []
    for name in models:
        spec, config = model_spec(name), model_config(name, layers)
        plans.append((name, spec, config, {m: inventory(config, spec, m, dtype) for m in methods}))
    keys = {key for *_, invs in plans for inv in invs.values() for _, key, _ in inv.entries}
    measured = measure_all(keys, workers)
    results = []
    for name, spec, config, invs in plans:
        out = _model_result(name, spec, config, invs, measured)
        if name in cross_check_models:
            out["cross_check"] = cross_check(
                name, spec, methods, dtype, cross_check_layers, measured
            )
        results.append(out)
    return results


def cross_check(
    name: str, spec: ModelSpec, methods: list[str], dtype: torch.dtype, layers: int,
    measured: dict[ShapeKey, ShapeBytes],
) -> dict[str, Any]:  # fmt: skip
    """Step the whole model (with ``layers`` layers: every distinct shape, fewer copies) and
    require the bytes the per-shape measurements predict for it, to the byte."""
    config = model_config(name, layers)
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


def _gib_row(model: str, method: str, r: dict[str, Any], paper_value: float | None) -> list[str]:
    ratio = r["state_ratio_to_adamw"]
    return [
        model,
        method,
        *(f"{gib(r[k]):.3f}" for k in BYTE_KEYS),
        f"{gib(r['total_bytes']):.3f}",
        "-" if ratio is None else f"{ratio:.3f}",
        f"{r['weights_plus_states_bytes'] / 1e9:.2f}",
        "-" if paper_value is None else f"{paper_value:.2f}",
    ]


def tables(results: list[dict[str, Any]], dtype_name: str) -> str:
    """The exact table and the GiB table next to the paper's, as the script prints them."""
    exact_rows, gib_rows = [], []
    for result in results:
        model = label(result)
        paper = PAPER_TABLE2_WEIGHTS_PLUS_STATES_G.get(result["model"], {})
        for method, r in result["methods"].items():
            exact_rows.append(
                [model, method, *(f"{r[k]:,}" for k in BYTE_KEYS), f"{r['total_bytes']:,}"]
            )
            gib_rows.append(_gib_row(model, method, r, paper.get(method)))
    exact = format_table(
        ["model", "method", "weights B", "grads B", "opt states B", "proj B", "total B"],
        exact_rows,
    )
    approx = format_table(
        ["model", "method", "weights", "grads", "states", "proj", "total", "states/adamw",
         "w+s GB", "paper GB"],
        gib_rows,
    )  # fmt: skip
    return (
        f"Exact bytes ({dtype_name} weights), one real optimizer step per distinct shape:\n"
        f"{exact}\n\nThe same in GiB; states/adamw = optimizer-state bytes / adamw's; "
        "w+s GB = (weights + states) / 1e9 next to the paper's Table 2 (BF16 estimate):\n"
        f"{approx}"
    )
