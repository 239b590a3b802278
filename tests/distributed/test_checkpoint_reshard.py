"""A one-process sharded optimizer checkpoint resumes on 2 and on 3 ranks (1 -> N resharding).

On one process every dense tensor is owned whole; on several, a large dense tensor is cut in row
blocks, so its whole saved state must be cut for the new owners (this used to fail with
``AssertionError: a whole block always matches``). The split threshold is lowered so that the
tiny model's dense tensors are cut. One launch per world size, every scenario inside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from gnlorp_dist.distributed import (
    ProcessGroupCommunicator,
    load_sharded_optimizer,
    save_sharded_optimizer,
)
from gnlorp_dist.optim import ownership
from gnlorp_dist.optim.comm import LocalCommunicator

from .harness import flat_parameters, run_ranks_within
from .test_sharded_optimizer import SAVE_AT, STEPS, _model, _optimizer, _rel, _train

SMALL_SPLIT = 64


def _resume_on_ranks(rank, world_size, out_dir):
    ownership.SPLIT_MIN_NUMEL = SMALL_SPLIT  # a forked rank: the parent's value is untouched
    out = Path(out_dir)
    source = out / "save-1"
    results = {}
    for bits in (32, 8):
        model = _model()
        model.load_state_dict(torch.load(source / f"bits-{bits}" / "model.pt", weights_only=True))
        model = DistributedDataParallel(model)
        optimizer = _optimizer(model.module, ProcessGroupCommunicator(), bits=bits)
        load_sharded_optimizer(optimizer, source / f"bits-{bits}")
        split = [p for p in optimizer.state if not optimizer.owned_block(p).whole]
        assert split, "no dense tensor is cut in row blocks: the scenario tests nothing"
        _train(model, optimizer, range(SAVE_AT, STEPS), rank, world_size)
        results[bits] = flat_parameters(model)
        results[f"split-{bits}"] = torch.tensor(len(split))
    torch.save(results, out / f"resumed-{world_size}-{rank}.pt")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    source = out / "save-1"
    references = {}
    for bits in (32, 8):
        model = _model()
        optimizer = _optimizer(model, LocalCommunicator(), bits=bits)

        def save(done, model=model, optimizer=optimizer, bits=bits):
            if done == SAVE_AT:
                save_sharded_optimizer(optimizer, source / f"bits-{bits}")
                torch.save(model.state_dict(), source / f"bits-{bits}" / "model.pt")

        _train(model, optimizer, range(STEPS), on_step=save)
        references[bits] = flat_parameters(model)
    for world_size in (2, 3):
        run_ranks_within(300, world_size, _resume_on_ranks, str(out))
    results = {
        (w, r): torch.load(out / f"resumed-{w}-{r}.pt", weights_only=True)
        for w in (2, 3)
        for r in range(w)
    }
    return references, results


@pytest.mark.parametrize("world_size", [2, 3])
def test_one_process_checkpoint_resumes_on_n_ranks(resumed, world_size):
    references, results = resumed
    ranks = [results[(world_size, r)] for r in range(world_size)]
    assert sum(int(r["split-32"]) for r in ranks) > 0
    assert _rel(ranks[0][32], references[32]) < 1e-4  # fp32 moments: re-cut exactly
    # 8-bit dense moments are dequantised, cut and quantised again over the new rows.
    assert _rel(ranks[0][8], references[8]) < 5e-2
    for other in ranks[1:]:
        assert torch.equal(other[32], ranks[0][32]) and torch.equal(other[8], ranks[0][8])


def _save_on_ranks(rank, world_size, out_dir):
    """save_checkpoint on every rank: a verified checkpoint, then a refused one when only
    rank 1's optimizer shard holds an infinity (every rank raises; nothing is written)."""
    import torch.distributed as dist  # noqa: PLC0415

    from gnlorp_dist.checkpoint.store import all_checkpoints, check_checkpoint, save_checkpoint  # noqa: PLC0415
    from gnlorp_dist.training.schedule import warmup_cosine_schedule  # noqa: PLC0415

    out = Path(out_dir)
    model = DistributedDataParallel(_model())
    optimizer = _optimizer(model.module, ProcessGroupCommunicator())
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=1, total_steps=10, min_ratio=0.1)
    _train(model, optimizer, range(2), rank, world_size)

    def save(step_no):
        return save_checkpoint(
            out, step=step_no, model=model.module, optimizer=optimizer, scheduler=scheduler,
            data_state={}, run_config={}, rank=rank, world_size=world_size, barrier=dist.barrier,
        )  # fmt: skip

    good = save(2)
    if rank == 0:
        check_checkpoint(good)  # both shards are in the manifest and verify
    if rank == 1:
        state = next(s for s in optimizer.state.values() if "exp_avg" in s)
        state["exp_avg"].view(-1)[0] = float("inf")
    try:
        save(3)
    except ValueError as err:
        assert "non-finite" in str(err), err
    else:
        raise AssertionError(f"rank {rank}: a non-finite shard was written")
    dist.barrier()
    assert [p.name for _s, _b, p in all_checkpoints(out)] == ["step-00000002"]
    (out / f"refused-{rank}").write_text("ok")


def test_every_rank_refuses_a_checkpoint_when_one_shard_is_not_finite(tmp_path):
    run_ranks_within(300, 2, _save_on_ranks, str(tmp_path))
    assert (tmp_path / "refused-0").is_file() and (tmp_path / "refused-1").is_file()
    manifest = (tmp_path / "checkpoints" / "step-00000002" / "manifest.json").read_text()
    assert "optimizer-shard-00001-of-00002.pt" in manifest
