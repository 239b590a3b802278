"""The bookkeeping of directions applied in the next forward (deferred_directions.py): which
update runs when. The distributed equality (bitwise the weights of the step that applies them at
once) is tests/distributed/test_sharded_optimizer.py's."""

from __future__ import annotations

import copy
import pickle

import torch
from torch import nn

from gnlorp_dist.optim.deferred_directions import ForwardHooks, PendingDirections


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _defer_doubling(pending: PendingDirections, param: torch.Tensor, log: list[str], name: str):
    def update() -> None:
        param.data.mul_(2.0)
        log.append(name)

    pending.defer(param, update)


def test_a_forward_applies_each_module_s_own_updates_just_before_it_runs():
    model, pending, log = _model(), PendingDirections(), []
    hooks = ForwardHooks(model, pending)
    first, second = model[0].weight, model[2].weight
    seen_by_second: list[torch.Tensor] = []
    model[2].register_forward_pre_hook(
        lambda m, a: seen_by_second.append(m.weight.detach().clone())
    )
    before = second.detach().clone()
    _defer_doubling(pending, first, log, "first")
    _defer_doubling(pending, second, log, "second")
    assert len(pending) == 2 and log == []
    model(torch.ones(1, 3))
    assert log == ["first", "second"] and len(pending) == 0
    assert torch.equal(seen_by_second[0], 2 * before)  # applied before the module ran
    hooks.remove()


def test_state_dict_and_remove_settle_everything():
    model, pending, log = _model(), PendingDirections(), []
    hooks = ForwardHooks(model, pending)
    assert pending.models == 1
    weight = model[2].weight
    expected = 2 * weight.detach().clone()
    _defer_doubling(pending, weight, log, "w")
    assert torch.equal(model.state_dict()["2.weight"], expected)
    _defer_doubling(pending, weight, log, "again")
    hooks.remove()
    assert log == ["w", "again"] and pending.models == 0
    hooks.remove()  # twice: nothing more
    assert pending.models == 0


def test_settle_picks_the_given_parameters_and_copies_start_empty():
    model, pending, log = _model(), PendingDirections(), []
    _defer_doubling(pending, model[0].weight, log, "a")
    _defer_doubling(pending, model[2].weight, log, "b")
    assert len(copy.deepcopy(pending)) == 0
    unpickled = pickle.loads(pickle.dumps(pending))  # its closures do not travel
    assert len(unpickled) == 0 and unpickled.models == 0
    pending.settle([model[2].weight])
    assert log == ["b"] and len(pending) == 1
    pending.settle()
    assert log == ["b", "a"]
