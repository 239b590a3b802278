"""Two ranks: a non-finite gradient at a NON-refresh step is skipped (or raises) on every rank.

ONE launch runs every scenario: DDP with a NaN in a projected gradient and an inf in a dense
one (skip: the run equals the run without that step), DDP with the raise policy (every rank
raises, nothing changed), owners reduction with a NaN on one rank only (both skip), and
DeepSpeed ZeRO-2 with a NaN loss (both ranks skip; equals the ZeRO-2 run without that step;
DeepSpeed's ZeRO optimizer skips it itself before ours is called).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.distributed import ProcessGroupCommunicator

from ..unit.test_groups import tiny_llama
from .harness import flat_parameters, run_ranks_within

STEPS, GAP, BAD, GLOBAL_BATCH, WORLD = 7, 3, 4, 4, 2  # refreshes at 0, 3, 6: step 4 is not one
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _model():
    return apply_weight_norm(tiny_llama(seed=11))


def _optimizer(model, **kwargs):
    groups = projected_param_groups(model, rank=6, update_proj_gap=GAP, scale=0.25)
    return GradNormLoRPAdamW(groups, lr=1e-2, weight_decay=0.01, **kwargs)


def _batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 128, (GLOBAL_BATCH, 16), generator=gen)


def _state(optimizer):
    return {
        (id(key) if torch.is_tensor(key) else key, k): v.clone() if torch.is_tensor(v) else v
        for key, entry in optimizer.state.items()
        if isinstance(entry, dict)
        for k, v in entry.items()
    }


def _same_state(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k] for k, v in a.items()
    )


def _pick(optimizer, kind, owner=None):
    """(name, param) of the first projected (or dense) parameter, owned whole by ``owner``."""
    for group in optimizer.param_groups:
        if ("rank" in group) != (kind == "projected"):
            continue
        for name, param in zip(group["param_names"], group["params"]):
            blocks = optimizer.ownership()[param]
            if owner is None or all(b.owner == owner for b in blocks):
                return name, param
    raise AssertionError(f"no {kind} parameter owned by rank {owner}")


def _ddp_run(rank, world, *, poison=None, omit=False, policy="skip"):
    """STEPS DDP steps; at BAD, ``poison(optimizer)`` spoils a gradient on every rank (as DDP's
    averaged gradient would be) or, with ``omit``, the step is left out."""
    model = DistributedDataParallel(_model())
    optimizer = _optimizer(
        model.module, communicator=ProcessGroupCommunicator(), on_nonfinite=policy
    )
    for step in range(STEPS):
        if omit and step == BAD:
            continue
        ids = _batch(step).chunk(world)[rank]
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if step == BAD and poison is not None:
            poison(optimizer)
            weights, state = flat_parameters(model.module), _state(optimizer)
            if policy == "raise":
                with pytest.raises(ValueError, match="non-finite gradient") as error:
                    optimizer.step()
                unchanged = torch.equal(weights, flat_parameters(model.module))
                unchanged = unchanged and _same_state(state, _state(optimizer))
                return {"raised": str(error.value), "unchanged": unchanged}
            optimizer.step()
            assert optimizer.last_step_skipped
            assert torch.equal(weights, flat_parameters(model.module))
            assert _same_state(state, _state(optimizer))
            continue
        optimizer.step()
        assert not optimizer.last_step_skipped
    return {"weights": flat_parameters(model.module), "skipped": optimizer.skipped_steps}


def _poison_projected(optimizer):
    name, param = _pick(optimizer, "projected", owner=1)
    param.grad[3, 2] = math.nan
    return name


def _poison_dense(optimizer):
    _name, param = _pick(optimizer, "dense")
    param.grad.view(-1)[0] = math.inf


def _poison_owned_by_0(optimizer):
    _name, param = _pick(optimizer, "projected", owner=0)
    param.grad[1, 1] = math.nan


def _owners_run(rank, world, *, poison, omit=False):
    """No DDP: the optimizer reduces each block to its owner; rank 1 alone holds a NaN in a
    gradient rank 0 owns."""
    model = _model()
    optimizer = _optimizer(
        model, communicator=ProcessGroupCommunicator(), reduce_gradients=True, on_nonfinite="skip"
    )
    for step in range(STEPS):
        if omit and step == BAD:
            continue
        ids = _batch(step).chunk(world)[rank]
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if step == BAD and poison and rank == 1:
            _poison_owned_by_0(optimizer)
        optimizer.step()
        assert optimizer.last_step_skipped == (step == BAD and poison)
    return {"weights": flat_parameters(model), "skipped": optimizer.skipped_steps}


def _zero2_run(rank, world, *, poison, omit=False):
    import deepspeed  # noqa: PLC0415
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415

    from gnlorp_dist.integrations.deepspeed import check_deepspeed_config  # noqa: PLC0415

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = check_deepspeed_config(
        {
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1,
            "train_batch_size": GLOBAL_BATCH,
            "gradient_clipping": 0.0,
            "bf16": {"enabled": False},
            "zero_optimization": {"stage": 2},
        }
    )
    model = _model()
    optimizer = _optimizer(model, on_nonfinite="skip")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def full():
        return torch.cat([safe_get_full_fp32_param(p).reshape(-1) for p in model.parameters()])

    for step in range(STEPS):
        if omit and step == BAD:
            continue
        ids = _batch(step).chunk(world)[rank]
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        if step == BAD and poison:
            loss = loss * math.nan
            before = full()
        engine.backward(loss)
        engine.step()
        if step == BAD and poison:
            # DeepSpeed's ZeRO-1/2 optimizer checks for overflow itself (fp32 too) and then does
            # not call ours; where it does call it, ours skips.
            assert torch.equal(before, full())
    return {"weights": full(), "skipped": optimizer.skipped_steps + engine.skipped_steps}


def _scenarios(rank, world, out_dir):
    torch.manual_seed(0)
    results = {
        "ddp-reference": _ddp_run(rank, world, omit=True),
        "ddp-projected": _ddp_run(rank, world, poison=_poison_projected),
        "ddp-dense": _ddp_run(rank, world, poison=_poison_dense),
        "ddp-raise": _ddp_run(rank, world, poison=_poison_owned_by_0, policy="raise"),
        "owners-reference": _owners_run(rank, world, poison=False, omit=True),
        "owners": _owners_run(rank, world, poison=True),
    }
    if HAS_DEEPSPEED:
        results["zero2-reference"] = _zero2_run(rank, world, poison=False, omit=True)
        results["zero2"] = _zero2_run(rank, world, poison=True)
    torch.save(results, Path(out_dir) / f"result-{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = tmp_path_factory.mktemp("nonfinite")
    run_ranks_within(240, WORLD, _scenarios, str(out))
    return [torch.load(out / f"result-{r}.pt", weights_only=False) for r in range(WORLD)]


SKIP_SCENARIOS = ["ddp-projected", "ddp-dense", "owners"] + (["zero2"] if HAS_DEEPSPEED else [])


@pytest.mark.parametrize("name", SKIP_SCENARIOS)
def test_skip_equals_the_run_without_that_step_on_every_rank(runs, name):
    reference = name.split("-")[0] + "-reference"
    for result in runs:
        assert result[name]["skipped"] >= 1 and result[reference]["skipped"] == 0
        assert torch.isfinite(result[name]["weights"]).all()
        assert torch.equal(result[name]["weights"], result[reference]["weights"])
    assert torch.equal(runs[0][name]["weights"], runs[1][name]["weights"])


def test_raise_raises_on_every_rank_before_anything_changes(runs):
    for rank, result in enumerate(runs):
        assert result["ddp-raise"]["unchanged"], rank
        assert f"(step {BAD})" in result["ddp-raise"]["raised"]
    # The owner names the parameter; the other rank did not check it and says so.
    assert "non-finite gradient (step" in runs[0]["ddp-raise"]["raised"]
    assert "a parameter owned by another rank" in runs[1]["ddp-raise"]["raised"]
