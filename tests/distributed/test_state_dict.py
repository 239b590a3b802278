"""``optimizer.state_dict()`` as real clients save it: rank 0's file only, resumed on 1, 2, 3 ranks.

One 2-rank launch runs every 2-rank scenario (the Accelerate save on every rank, the Trainer
save after consolidation, the rank-0-only save that must fail fast, a wrong-rank shard, and
un-averaged gradients); one 3-rank launch resumes the 2-rank file. The one-process reference
and the 1-rank resume run in this process. The model's embedding and head are big enough to be
split in row blocks, so the state dict joins and re-cuts them.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.distributed import (
    ProcessGroupCommunicator,
    load_sharded_optimizer,
    save_sharded_optimizer,
)
from gnlorp_dist.optim import state_dict as state_io
from gnlorp_dist.optim.comm import LocalCommunicator
from gnlorp_dist.optim.ownership import SPLIT_MIN_NUMEL
from tests.tiny_llama import small_llama

from .harness import flat_parameters, run_ranks_within, train_on_global_batches, unwrapped

STEPS, SAVE_AT, GAP, GLOBAL_BATCH, VOCAB = 12, 6, 5, 6, 2048
TIMEOUT_S = 2  # the rank-0-only save's wait, short for the test


def _model():
    torch.manual_seed(5)
    # Embedding and head 2048 x 32 = SPLIT_MIN_NUMEL: split in row blocks.
    model = small_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=88, num_hidden_layers=1)
    return apply_weight_norm(model)


def _optimizer(model, communicator, **kwargs):
    groups = projected_param_groups(model, rank=6, update_proj_gap=GAP, scale=0.25)
    return GradNormLoRPAdamW(
        groups, lr=1e-2, weight_decay=0.01, communicator=communicator, **kwargs
    )


def _global_batch(step):
    gen = torch.Generator().manual_seed(2000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, 16), generator=gen)


def _train(model, optimizer, steps, rank=0, world_size=1, on_step=None):
    train_on_global_batches(model, optimizer, steps, _global_batch, rank, world_size, on_step)


def _resume(source, comm, rank, world_size, sharded=False, bits=32):
    """A fresh model and optimizer from rank 0's files (or, ``sharded``, from every rank's
    save_sharded_optimizer file: the exact path to compare with), trained to the end."""
    model = _model()
    tag = "" if bits == 32 else str(bits)
    model.load_state_dict(torch.load(source / f"model{tag}.pt", weights_only=True))
    if world_size > 1:
        model = DistributedDataParallel(model)
    optimizer = _optimizer(unwrapped(model), comm, bits=bits)
    if sharded:
        load_sharded_optimizer(optimizer, source / "sharded")
    else:
        optimizer.load_state_dict(torch.load(source / f"optimizer{tag}.pt", weights_only=True))
    _train(model, optimizer, range(SAVE_AT, STEPS), rank, world_size)
    return flat_parameters(model)


def _two_ranks(rank, world_size, out_dir):
    out = Path(out_dir)
    os.environ[state_io.TIMEOUT_ENV] = str(TIMEOUT_S)
    comm = ProcessGroupCommunicator()
    model = DistributedDataParallel(_model())
    optimizer = _optimizer(model.module, comm)
    result = {}

    def save(done):
        if done != SAVE_AT:
            return
        result["every_rank"] = optimizer.state_dict()  # accelerate's save_state: every rank
        save_sharded_optimizer(optimizer, out / "sharded")
        optimizer.consolidate_state_dict()  # what the Trainer integration does on every rank
        if rank == 0:  # the Trainer's save: rank 0 only
            torch.save(optimizer.state_dict(), out / "optimizer.pt")
            torch.save(model.module.state_dict(), out / "model.pt")
        comm.all_gather_object(None)  # the files exist before any rank reads them

    _train(model, optimizer, range(STEPS), rank, world_size, save)
    result["final"] = flat_parameters(model)
    result["resumed"] = _resume(out, comm, rank, world_size)

    # 8-bit moments: the dense row blocks are dequantised, joined and quantised whole.
    model8 = DistributedDataParallel(_model())
    optimizer8 = _optimizer(model8.module, comm, bits=8)
    _train(model8, optimizer8, range(SAVE_AT), rank, world_size)
    if rank == 0:
        optimizer8.consolidate_state_dict()
        torch.save(optimizer8.state_dict(), out / "optimizer8.pt")
        torch.save(model8.module.state_dict(), out / "model8.pt")
    else:
        optimizer8.consolidate_state_dict()
    comm.all_gather_object(None)
    _train(model8, optimizer8, range(SAVE_AT, STEPS), rank, world_size)
    result["final8"] = flat_parameters(model8)
    result["resumed8"] = _resume(out, comm, rank, world_size, bits=8)

    # A rank-0-only state_dict() without consolidation: a clear error after the timeout.
    if rank == 0:
        try:
            optimizer.state_dict()
        except ValueError as error:
            result["rank0_only_error"] = str(error)
    comm.all_gather_object(None)  # rank 1 waits here until rank 0 gave up

    # Rank 0's shard loaded into rank 1.
    shard = state_io.with_marker(comm, torch.optim.Optimizer.state_dict(optimizer))
    shards = comm.all_gather_object(shard)
    try:
        _optimizer(_model(), comm).load_state_dict(shards[0])
    except ValueError as error:
        result["wrong_rank_error"] = str(error)

    # No DDP, each rank its own data: refused at the first step, on every rank, nothing moved.
    plain = _model()
    plain_opt = _optimizer(plain, comm)
    ids = _global_batch(100 + rank)
    plain(input_ids=ids, labels=ids).loss.backward()
    before = flat_parameters(plain)
    try:
        plain_opt.step()
    except ValueError as error:
        result["unaveraged_error"] = str(error)
    result["unaveraged_untouched"] = torch.equal(before, flat_parameters(plain))
    torch.save(result, out / f"two-{rank}.pt")


def _three_ranks(rank, world_size, out_dir):
    out = Path(out_dir)
    comm = ProcessGroupCommunicator()
    result = {
        "resumed": _resume(out, comm, rank, world_size),
        "resumed_sharded": _resume(out, comm, rank, world_size, sharded=True),
    }
    torch.save(result, out / f"three-{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("state_dict")
    reference = _model()
    ref_opt = _optimizer(reference, LocalCommunicator())
    saved = {}

    def keep(done):
        if done == SAVE_AT:
            saved["state"] = copy.deepcopy(ref_opt.state_dict())

    _train(reference, ref_opt, range(STEPS), on_step=keep)
    run_ranks_within(120, 2, _two_ranks, str(out))
    run_ranks_within(120, 3, _three_ranks, str(out))
    load = lambda name: torch.load(out / name, weights_only=True)  # noqa: E731
    return {
        "out": out,
        "reference_state": saved["state"],
        "reference": flat_parameters(reference),
        "two": [load(f"two-{r}.pt") for r in range(2)],
        "three": [load(f"three-{r}.pt") for r in range(3)],
    }


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_the_model_has_dense_tensors_split_in_row_blocks():
    embedding = _model().model.embed_tokens.weight
    assert embedding.numel() >= SPLIT_MIN_NUMEL


def test_state_dict_on_every_rank_is_the_one_process_state(runs):
    expected = runs["reference_state"]
    saved = torch.load(runs["out"] / "optimizer.pt", weights_only=True)
    for got in [r["every_rank"] for r in runs["two"]] + [saved]:
        assert got["gnlorp"] == {"format": 1, "consolidated": True, "world_size": 2}
        assert got["param_groups"] == expected["param_groups"]
        assert sorted(got["state"]) == sorted(expected["state"])
        for index, state in expected["state"].items():
            assert sorted(got["state"][index]) == sorted(state)
            for key, value in state.items():
                if torch.is_tensor(value):
                    # Float agreement (DDP averages per rank, then over ranks): relative norm.
                    assert _rel(got["state"][index][key], value) < 1e-4, (index, key)
                else:
                    assert got["state"][index][key] == value
    first, second = (r["every_rank"] for r in runs["two"])
    for index, state in first["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(value, second["state"][index][key])
                assert torch.equal(value, saved["state"][index][key])


def test_resume_from_rank_0s_file_on_two_ranks_is_exact(runs):
    for result in runs["two"]:
        assert torch.equal(result["resumed"], result["final"])


# On another world size DDP averages in another order: the run continues within float noise of
# the uninterrupted 2-rank run (measured 5e-7 and 1e-6), and exactly as the sharded files resume.


def test_resume_from_rank_0s_file_on_one_process(runs):
    resumed = _resume(runs["out"], LocalCommunicator(), 0, 1)
    assert torch.equal(resumed, _resume(runs["out"], LocalCommunicator(), 0, 1, sharded=True))
    assert _rel(resumed, runs["two"][0]["final"]) < 1e-5
    assert _rel(runs["reference"], flat_parameters(_model())) > 1e-2  # the run moved the weights


def test_resume_from_rank_0s_file_on_three_ranks(runs):
    results = [r["resumed"] for r in runs["three"]]
    assert torch.equal(results[0], runs["three"][0]["resumed_sharded"])
    assert _rel(results[0], runs["two"][0]["final"]) < 1e-5
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_eight_bit_state_is_joined_and_resumes_on_two_ranks_and_one(runs):
    saved = torch.load(runs["out"] / "optimizer8.pt", weights_only=True)
    # The embedding and the head: two row blocks of 1024 rows when saved, one tensor here.
    split = [e for e in saved["state"].values() if e["exp_avg"].shape == (VOCAB, 32)]
    assert len(split) == 2
    for entry in split:
        assert entry["exp_avg"].dtype == entry["exp_avg_sq"].dtype == torch.uint8
        assert entry["exp_avg_absmax"].numel() == VOCAB * 32 // 256
    final = runs["two"][0]["final8"]
    one = _resume(runs["out"], LocalCommunicator(), 0, 1, bits=8)
    # Codes sit on the whole tensor's block grid: joined and cut exactly.
    assert all(torch.equal(r["resumed8"], r["final8"]) for r in runs["two"])
    # On one process the gradients are averaged in another order: a code whose value falls near
    # a rounding boundary may round the other way, so the run continues within the 8-bit
    # rounding of the states, far below the difference 8-bit makes to the trajectory at all.
    quantisation = _rel(final, runs["two"][0]["final"])
    assert _rel(one, final) < 0.05 * quantisation, (_rel(one, final), quantisation)


def test_rank_0_only_state_dict_without_consolidation_fails_fast_with_the_fix(runs):
    message = runs["two"][0]["rank0_only_error"]
    assert f"within {TIMEOUT_S} s" in message
    assert "consolidate_state_dict() on every rank" in message
    assert "GradNormLoRPTrainer" in message
    assert "rank0_only_error" not in runs["two"][1]


def test_a_shard_loaded_into_another_rank_is_refused(runs):
    assert "wrong_rank_error" not in runs["two"][0]  # its own shard loads
    message = runs["two"][1]["wrong_rank_error"]
    assert "rank 0's shard of a 2-rank job" in message
    assert "rank 1 of 2" in message


def test_unaveraged_gradients_are_refused_on_every_rank_before_any_update(runs):
    for result in runs["two"]:
        assert "not averaged across ranks" in result["unaveraged_error"]
        assert "torchrun" in result["unaveraged_error"]
        assert result["unaveraged_untouched"]
