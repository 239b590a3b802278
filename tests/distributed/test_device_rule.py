"""The device rule on 2 gloo ranks: every buffer that travels is on the communicator's device.

One launch runs every scenario twice on each rank: with the default device set to ``meta``
around the library's calls and without it. The communicator is a
:class:`~tests.distributed.harness.StrictDeviceCommunicator`, which refuses (as NCCL does) any
tensor not on its own device, so a collective buffer built on the default device fails loudly.
The meta run must give bitwise the weights and states of the plain run, and every rank the same
weights. One-process scenarios are in ``tests/unit/test_device_rule.py``.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from gnlorp_dist import GradNormLoRPAdamW

from ..unit.test_device_rule import (
    STEPS,
    default_device,
    flat,
    groups,
    inputs,
    make_params,
    per_layer_updates,
    run_fragments,
    set_grads,
    state_tensors,
    weight_norm_model,
    weight_norm_optimizer,
)
from .harness import StrictDeviceCommunicator, run_ranks_within

WORLD = 2


def sharded_step(meta, comm, bits, reduce_gradients):
    """DDP-style steps (state sharded over the ranks); with ``reduce_gradients`` each rank has
    its own gradient and the optimizer reduces it to the owner, else the gradients are already
    averaged (identical on every rank, as after DDP's all-reduce)."""
    projected, dense = make_params()
    optimizer = GradNormLoRPAdamW(
        groups(projected, dense),
        lr=1e-2,
        weight_decay=0.01,
        bits=bits,
        communicator=comm,
        reduce_gradients=reduce_gradients,
    )
    for step in range(STEPS):
        set_grads(projected + dense, 100 * comm.rank + step if reduce_gradients else step)
        with default_device(meta):
            optimizer.step()
    return [p.detach().clone() for p in projected + dense], state_tensors(optimizer)


def per_layer(meta, comm, bits):
    """Per-layer updates over the ranks (no DDP), 2 micro-batches per step, own data per rank."""
    model = weight_norm_model()
    optimizer = weight_norm_optimizer(model, bits, communicator=comm, reduce_gradients=True)
    with per_layer_updates(meta, optimizer, accumulation_steps=2):
        for step in range(STEPS):
            for micro in range(2):
                loss = model(inputs(100 * comm.rank + step, micro)).square().mean() / 2
                with default_device(meta):
                    loss.backward()
    return flat(model), state_tensors(optimizer)


def fragments(meta, comm, bits):
    weights, optimizer = run_fragments(meta, bits, comm)
    return weights, state_tensors(optimizer)


SCENARIOS = {
    "sharded-32bit": lambda meta, comm: sharded_step(meta, comm, 32, False),
    "sharded-8bit": lambda meta, comm: sharded_step(meta, comm, 8, False),
    "reduce-gradients-32bit": lambda meta, comm: sharded_step(meta, comm, 32, True),
    "reduce-gradients-8bit": lambda meta, comm: sharded_step(meta, comm, 8, True),
    "per-layer-32bit": lambda meta, comm: per_layer(meta, comm, 32),
    "per-layer-8bit": lambda meta, comm: per_layer(meta, comm, 8),
    "fragments-32bit": lambda meta, comm: fragments(meta, comm, 32),
    "fragments-8bit": lambda meta, comm: fragments(meta, comm, 8),
}


def _rank_scenarios(rank, world_size, out_dir):
    comm = StrictDeviceCommunicator()
    results = {}
    for name, scenario in SCENARIOS.items():
        entry = {}
        for meta in (True, False):
            try:
                weights, states = scenario(meta, comm)
                entry["meta" if meta else "plain"] = {"weights": weights, "states": states}
            except Exception as error:  # recorded, and asserted on in the parent
                entry["meta_error" if meta else "plain_error"] = "".join(
                    traceback.format_exception_only(error)
                ) + "".join(traceback.format_tb(error.__traceback__)[-2:])
        results[name] = entry
    torch.save(results, Path(out_dir) / f"rank-{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-rule")
    run_ranks_within(300, WORLD, _rank_scenarios, str(out))
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_step_under_meta_default_with_a_strict_communicator(ranks, name):
    for rank, results in enumerate(ranks):
        entry = results[name]
        assert "plain_error" not in entry, f"rank {rank}: {entry['plain_error']}"
        assert "meta_error" not in entry, f"rank {rank}: {entry['meta_error']}"
        for key in ("weights", "states"):
            got, expected = entry["meta"][key], entry["plain"][key]
            assert len(got) == len(expected) > 0
            for a, b in zip(got, expected, strict=True):
                assert a.device.type == "cpu" and a.dtype == b.dtype and torch.equal(a, b)
    if not name.startswith("fragments"):  # fragments: each rank holds its own run
        for other in ranks[1:]:
            for a, b in zip(other[name]["meta"]["weights"], ranks[0][name]["meta"]["weights"]):
                assert torch.equal(a, b)
    start = (
        make_params()[0][0] if not name.startswith("per-layer") else flat(weight_norm_model())[0]
    )
    if not name.startswith("fragments"):
        assert not torch.equal(ranks[0][name]["meta"]["weights"][0], start)
