"""FSDP2 (``fully_shard``) with GradNormLoRPAdamW on 2 and 3 gloo ranks equals one process.

The tiny weight-normalized LLaMA is sharded the torchtitan way (each decoder layer, then the
root) and trained 20 steps with refreshes at steps 0, 5, 10 and 15 on the same global batches as
the one-process reference. One launch per world size runs every scenario of that size; the
2-rank launch saves a ``torch.distributed.checkpoint`` at step 10, which the 3-rank launch and a
1-rank launch resume. 8-bit states run on 2 and 3 ranks (rows cut inside 8-bit blocks, scales
agreed), and the 3-rank launch resumes the 2-rank launch's 8-bit checkpoint. The refusals
(FSDP1, HSDP meshes, tensor-parallel placements, per-layer) run in the 2-rank launch too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from gnlorp_dist import (
    GradNormLoRPAdamW,
    PerLayerUpdates,
    apply_weight_norm,
    projected_param_groups,
)
from gnlorp_dist.distributed import ProcessGroupCommunicator
from gnlorp_dist.optim.comm import LocalCommunicator

from ..unit.test_groups import tiny_llama
from .harness import run_ranks

STEPS, SAVE_AT, GAP, GLOBAL_BATCH = 20, 10, 5, 6
NUM_PROJECTED = 14  # 2 layers x 7 projections of the tiny LLaMA
REFRESHES = STEPS // GAP


def _model():
    return apply_weight_norm(tiny_llama(seed=11))


def _groups(model):
    return projected_param_groups(model, rank=6, update_proj_gap=GAP, scale=0.25)


def _optimizer(model, communicator, **kwargs):
    return GradNormLoRPAdamW(
        _groups(model), lr=1e-2, weight_decay=0.01, communicator=communicator, **kwargs
    )


def _shard(model):
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _global_batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 128, (GLOBAL_BATCH, 16), generator=gen)


def _train(model, optimizer, steps, rank=0, world_size=1, on_step=None):
    losses = []
    for step in steps:
        ids = _global_batch(step).chunk(world_size)[rank]
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1)
    return losses


EIGHT_BIT = {"bits": 8, "min_8bit_size": 32}
"""8-bit states down to 32 elements: the low-rank moments (rows x 6) and the weight-norm
magnitudes too, whose rows FSDP2 cuts inside 8-bit blocks."""


def _eight_bit_scenario(rank, world_size, out, resume_from):
    """20 8-bit steps (weights after step 2 kept: the first step that reads codes); the 2-rank
    launch saves a checkpoint at step 10 (8-bit moments saved as their float values), which the
    3-rank launch resumes."""
    result = {}
    model = _shard(_model())
    optimizer = _optimizer(model, ProcessGroupCommunicator(), **EIGHT_BIT)

    def on_step(done):
        if done == 2:
            result["step2"] = _full_weights(model)
        if done == SAVE_AT and resume_from is None:
            _save(out / f"dcp8-{world_size}", model, optimizer)

    result["losses"] = _train(model, optimizer, range(STEPS), rank, world_size, on_step)
    result["uint8_states"] = sum(
        1
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dtype == torch.uint8
    )
    if resume_from is not None:
        resumed = _shard(_model())
        resumed_opt = _optimizer(resumed, ProcessGroupCommunicator(), **EIGHT_BIT)
        _load(out / f"dcp8-{resume_from}", resumed, resumed_opt)
        result["resumed_losses"] = _train(
            resumed, resumed_opt, range(SAVE_AT, STEPS), rank, world_size
        )
    return result


def _full_weights(model) -> torch.Tensor:
    """Every parameter, gathered whole (a collective under FSDP2), flattened into one vector."""
    tensors = []
    for param in model.parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        tensors.append(full.detach().reshape(-1))
    return torch.cat(tensors)


def _state_bytes(optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )


def _save(directory, model, optimizer):
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def _load(directory, model, optimizer):
    model_state, optim_state = get_state_dict(model, optimizer)  # templates of this world size
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def _fsdp1_optimizer(comm):
    model = FullyShardedDataParallel(_model(), device_id=torch.device("cpu"), use_orig_params=True)
    return GradNormLoRPAdamW(model.parameters(), lr=1e-2, communicator=comm)


def _hsdp_optimizer(comm):
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    model = _model()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return _optimizer(model, comm)


def _tensor_parallel_optimizer(comm):
    mesh = init_device_mesh("cpu", (2,))
    column = torch.nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)]))
    return GradNormLoRPAdamW(
        [{"params": [column], "rank": 2, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std"}],
        communicator=comm,
    )


def _refusals(comm) -> dict[str, str]:
    """The message of each refusal, by case (raised before any step)."""
    messages = {}
    cases = {
        "per_layer": lambda: PerLayerUpdates(_optimizer(_shard(_model()), comm)),
        "fsdp1": lambda: _fsdp1_optimizer(comm),
        "hsdp": lambda: _hsdp_optimizer(comm),
        "tensor_parallel": lambda: _tensor_parallel_optimizer(comm),
    }
    for case, build in cases.items():
        try:
            build()
            messages[case] = "no error"
        except ValueError as err:
            messages[case] = str(err)
    return messages


ACCUMULATION_STEPS, MICRO = 6, 2


def _micro_batches(step, rank, world_size):
    """Micro-batch i of this rank; the one-process reference's i is every rank's i joined."""
    rows = _global_batch(step).chunk(world_size)[rank]
    return list(rows.chunk(MICRO))


def _accumulation_scenario(rank, world_size, comm):
    """gnlorp-train's step function with 2 micro-batches under FSDP2: gradients reduce-scattered
    once per step (the last micro-batch), counted, and the weights of one process."""
    import torch.distributed as dist  # noqa: PLC0415

    from gnlorp_dist.training.steps import train_step  # noqa: PLC0415

    calls = [0]
    # FSDP2's gradient collective (torch 2.13: reduce_scatter_single; older: _tensor).
    name = (
        "reduce_scatter_single"
        if hasattr(dist, "reduce_scatter_single")
        else "reduce_scatter_tensor"
    )
    original = getattr(dist, name)

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    model = _shard(_model())
    optimizer = _optimizer(model, comm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    setattr(dist, name, counting)
    try:
        for step in range(ACCUMULATION_STEPS):
            train_step(model, optimizer, scheduler, _micro_batches(step, rank, world_size), 0.0)
    finally:
        setattr(dist, name, original)
    return {"weights": _full_weights(model), "reduce_scatters": calls[0]}


def _scenarios(rank, world_size, out_dir, resume_from):
    out = Path(out_dir)
    comm = ProcessGroupCommunicator()
    result: dict = {}
    if resume_from is None or world_size > 1:
        model = _shard(_model())
        optimizer = _optimizer(model, comm)

        def maybe_save(done):
            if done == SAVE_AT and resume_from is None:
                _save(out / f"dcp-{world_size}", model, optimizer)

        _train(model, optimizer, range(STEPS), rank, world_size, maybe_save)
        result["weights"] = _full_weights(model)
        result["refreshes"] = optimizer.refresh_count
        result["state_bytes"] = _state_bytes(optimizer)
    if resume_from is not None:
        resumed = _shard(_model())
        resumed_opt = _optimizer(resumed, comm)
        _load(out / f"dcp-{resume_from}", resumed, resumed_opt)
        _train(resumed, resumed_opt, range(SAVE_AT, STEPS), rank, world_size)
        result["resumed"] = _full_weights(resumed)
    if world_size > 1:
        result["eight_bit"] = _eight_bit_scenario(rank, world_size, out, resume_from)
    if world_size == 2:
        result["refusals"] = _refusals(comm)
        result["accumulated"] = _accumulation_scenario(rank, world_size, comm)
    torch.save(result, out / f"result-{world_size}-{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every rank (harness.py): like arithmetic on both sides
    try:
        reference = _model()
        ref_opt = _optimizer(reference, LocalCommunicator())
        _train(reference, ref_opt, range(STEPS))
        eight = _model()
        eight_opt = _optimizer(eight, LocalCommunicator(), **EIGHT_BIT)
        eight_step2 = {}

        def keep(done):
            if done == 2:
                eight_step2["weights"] = torch.cat(
                    [p.detach().reshape(-1) for p in eight.parameters()]
                )

        eight_losses = _train(eight, eight_opt, range(STEPS), on_step=keep)
    finally:
        torch.set_num_threads(threads)
    run_ranks(2, _scenarios, str(out), None)
    run_ranks(3, _scenarios, str(out), 2)
    run_ranks(1, _scenarios, str(out), 2)
    results = {
        (w, r): torch.load(out / f"result-{w}-{r}.pt", weights_only=True)
        for w in (1, 2, 3)
        for r in range(w)
    }
    ref_weights = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    return {
        "reference": ref_weights,
        "ref_opt": ref_opt,
        "results": results,
        "eight_bit": {"step2": eight_step2["weights"], "losses": eight_losses},
    }


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("world_size", [2, 3])
def test_weights_match_one_process(runs, world_size):
    weights = runs["results"][(world_size, 0)]["weights"]
    assert _rel(weights, runs["reference"]) < 1e-4
    start = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
    assert _rel(runs["reference"], start) > 1e-2  # the run moved the weights


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_subspace_is_computed_once_per_refresh_in_the_whole_job(runs, world_size):
    counts = [runs["results"][(world_size, r)]["refreshes"] for r in range(world_size)]
    assert sum(counts) == NUM_PROJECTED * REFRESHES == runs["ref_opt"].refresh_count
    assert all(0 < c < sum(counts) for c in counts), counts


@pytest.mark.parametrize("world_size", [2, 3])
def test_state_is_sharded_evenly(runs, world_size):
    per_rank = [runs["results"][(world_size, r)]["state_bytes"] for r in range(world_size)]
    even = sum(per_rank) / world_size
    assert max(per_rank) <= 1.15 * even, per_rank
    # Nothing is held twice but the bases of right-projected matrices (every rank projects
    # its rows with the whole basis): the moments are split, not copied.
    one_process = _state_bytes(runs["ref_opt"])
    assert max(per_rank) < 0.8 * one_process, (per_rank, one_process)


@pytest.mark.parametrize("world_size", [3, 1])
def test_a_checkpoint_saved_on_two_ranks_resumes_on_another_number(runs, world_size):
    resumed = runs["results"][(world_size, 0)]["resumed"]
    assert _rel(resumed, runs["reference"]) < 1e-4


def test_accumulation_reduce_scatters_once_per_step_and_matches_one_process(runs):
    from gnlorp_dist.training.steps import train_step  # noqa: PLC0415

    reference = _model()
    optimizer = _optimizer(reference, LocalCommunicator())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    for step in range(ACCUMULATION_STEPS):
        joined = [
            torch.cat([_micro_batches(step, r, 2)[i] for r in range(2)]) for i in range(MICRO)
        ]
        train_step(reference, optimizer, scheduler, joined, 0.0)
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    accumulated = runs["results"][(2, 0)]["accumulated"]
    assert _rel(accumulated["weights"], expected) < 1e-4
    # One reduce-scatter per FSDP unit (2 decoder layers + the root) per step, not per micro-batch.
    assert accumulated["reduce_scatters"] == 3 * ACCUMULATION_STEPS, accumulated


def test_refusals_name_the_option(runs):
    refusals = runs["results"][(2, 0)]["refusals"]
    assert "per-layer updates under FSDP2" in refusals["per_layer"]
    assert "FSDP1 flat parameters" in refusals["fsdp1"] and "fully_shard" in refusals["fsdp1"]
    assert "2-D device mesh (1, 2)" in refusals["hsdp"]
    assert "Shard(dim=1)" in refusals["tensor_parallel"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_8bit_states_on_rows_cut_inside_blocks_match_one_process(runs, world_size):
    """8-bit moments sharded with FSDP2's rows sit on each tensor's block grid (a block two
    ranks' rows share gets one agreed scale): the first step that reads codes gives one
    process's weights to 1e-5, and 20 steps track one process's 8-bit loss."""
    reference = runs["eight_bit"]
    for rank in range(world_size):
        result = runs["results"][(world_size, rank)]["eight_bit"]
        assert result["uint8_states"] > 0
        assert _rel(result["step2"], reference["step2"]) < 1e-5
    losses = runs["results"][(world_size, 0)]["eight_bit"]["losses"]
    # Each rank's loss is its share's mean; equal shares only when the batch divides evenly.
    if GLOBAL_BATCH % world_size == 0:
        shares = [
            runs["results"][(world_size, r)]["eight_bit"]["losses"] for r in range(world_size)
        ]
        losses = [sum(step) / world_size for step in zip(*shares)]
        tail, want = sum(losses[-5:]) / 5, sum(reference["losses"][-5:]) / 5
        assert abs(tail - want) < 0.01 * want, (tail, want)


def test_8bit_checkpoint_saved_on_two_ranks_resumes_on_three(runs):
    """The 8-bit moments travel as their float values (a block's scale may span two ranks'
    rows, which no DTensor placement holds); the first step after loading quantises them again
    on the same grid, so the resumed run continues the 2-rank run."""
    shares = [runs["results"][(3, r)]["eight_bit"]["resumed_losses"] for r in range(3)]
    resumed = [sum(step) / 3 for step in zip(*shares)]
    uninterrupted = [
        sum(step) / 2
        for step in zip(*(runs["results"][(2, r)]["eight_bit"]["losses"] for r in range(2)))
    ][SAVE_AT:]
    for got, want in zip(resumed, uninterrupted):
        assert abs(got - want) < 1e-3 * want, (got, want)
