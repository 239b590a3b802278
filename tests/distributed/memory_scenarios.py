"""Issue-14 features on several ranks, run inside test_sharded_optimizer's launches.

A synthetic problem (no model: its gradient is an element-wise function of the weights, so every
rank and one process see bitwise the same averaged gradient, as DDP hands it) whose dense tensor
is cut by the ownership plan in the middle of 8-bit blocks, and whose projected matrix has
low-rank moments above ``min_8bit_size``. Both sides run LAPACK on one thread: a float32 SVD's
result depends on its thread count (1e-5 here), which is not what these tests are about.

- ``grid``: DDP's layout, 8-bit, from the one-process state after 3 steps, one step and then 19
  more; every rank must hold the one-process codes and weights bit for bit;
- ``lazy``: the low-rank reduction (every rank sends its low-rank gradient, the owner averages
  them and broadcasts the direction), 8-bit moments, INT8 bases and lazy refresh; ranks must
  agree on every lazily scheduled refresh (a collective) and give one process's run.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from gnlorp_dist import GradNormLoRPAdamW
from gnlorp_dist.optim.ownership import SPLIT_MIN_NUMEL

DENSE_SHAPE = (1001, 67)  # row blocks start at 501 * 67 and 334 * 67: inside 8-bit blocks
MATRIX_SHAPE = (300, 200)  # low-rank moments 300 x 32 = 9600 elements: 8-bit
STEPS, FIRST = 20, 3
assert DENSE_SHAPE[0] * DENSE_SHAPE[1] >= SPLIT_MIN_NUMEL


def make_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(5)
    return [
        # All of the matrix's error lies in a rank-32 subspace, the projection's rank: every
        # low-rank coordinate carries signal (near-zero ones would turn rounding into steps).
        torch.nn.Parameter(torch.zeros(MATRIX_SHAPE)),
        torch.nn.Parameter(torch.randn(DENSE_SHAPE, generator=gen) * 0.1),
    ]


def targets() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    low = torch.randn(MATRIX_SHAPE[0], 32, generator=gen) @ torch.randn(
        32, MATRIX_SHAPE[1], generator=gen
    )
    return [low * 0.1, torch.randn(DENSE_SHAPE, generator=gen) * 0.1]


def make_optimizer(params, communicator=None, **options) -> GradNormLoRPAdamW:
    group = {"params": [params[0]], "rank": 32, "update_proj_gap": 4, "scale": 0.25}
    group.update(proj_type="std", **options.pop("projection", {}))
    return GradNormLoRPAdamW(
        [group, {"params": [params[1]]}],
        lr=1e-2,
        weight_decay=0.01,
        bits=8,
        min_8bit_size=1024,
        communicator=communicator,
        **options,
    )


def set_gradients(params) -> float:
    """The loss ``sum ||W - W*||^2``, and its gradient in ``.grad``."""
    loss = 0.0
    for param, target in zip(params, targets()):
        error = param.detach() - target
        loss += float(error.square().sum())
        param.grad = 2 * error
    return loss


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def one_process() -> dict:
    """The references: the 8-bit run's state after FIRST steps (what every rank loads), its
    weights and codes after one more step, its losses to STEPS; the lazy run's weights."""
    params = make_params()
    optimizer = make_optimizer(params)
    losses = []
    for _ in range(FIRST):
        losses.append(set_gradients(params))
        optimizer.step()
    start = {
        "state": copy.deepcopy(optimizer.state_dict()),
        "weights": [p.detach().clone() for p in params],
    }
    losses.append(set_gradients(params))
    optimizer.step()
    after_one = {
        "weights": torch.cat([p.detach().reshape(-1) for p in params]),
        "state": copy.deepcopy(optimizer.state_dict()),
    }
    for _ in range(FIRST + 1, STEPS):
        losses.append(set_gradients(params))
        optimizer.step()
    lazy_params = make_params()
    lazy = make_optimizer(lazy_params, projection={"proj_bits": 8, "lazy_refresh_threshold": 0.5})
    lazy_losses = []
    for _ in range(STEPS):
        lazy_losses.append(set_gradients(lazy_params))
        lazy.step()
    return {
        "start": start,
        "after_one": after_one,
        "losses": losses,
        "lazy": torch.cat([p.detach().reshape(-1) for p in lazy_params]),
        "lazy_refreshes": lazy.refresh_count,
        "lazy_losses": lazy_losses,
    }


@one_thread()
def ranks(comm, start: dict) -> dict:
    params = make_params()
    with torch.no_grad():
        for param, saved in zip(params, start["weights"]):
            param.copy_(saved)
    optimizer = make_optimizer(params, comm)
    optimizer.load_state_dict(start["state"])
    losses = [set_gradients(params)]
    optimizer.step()
    result = {
        "after_one": torch.cat([p.detach().reshape(-1) for p in params]),
        "after_one_state": copy.deepcopy(
            optimizer.state_dict()
        ),  # consolidated: codes joined from the blocks
    }
    for _ in range(FIRST + 1, STEPS):
        losses.append(set_gradients(params))
        optimizer.step()
    result["losses"] = losses
    lazy_params = make_params()
    lazy = make_optimizer(
        lazy_params,
        comm,
        projection={"proj_bits": 8, "lazy_refresh_threshold": 0.5},
        gradient_reduction="low_rank",
    )
    result["lazy_losses"] = []
    for _ in range(STEPS):
        result["lazy_losses"].append(set_gradients(lazy_params))
        lazy.step()
    result["lazy"] = torch.cat([p.detach().reshape(-1) for p in lazy_params])
    result["lazy_refreshes"] = lazy.refresh_count
    return result
