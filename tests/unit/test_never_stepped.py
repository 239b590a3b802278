"""Another optimizer training a GradNormLoRPAdamW's parameters before it ever stepped is logged.

The case behind it: ``transformers.Trainer(optimizers=(GradNormLoRPAdamW(...), None))`` with a
DeepSpeed config trains DeepSpeed's torch AdamW, and the given optimizer never steps (the real
Trainer + DeepSpeed run is in tests/distributed/clients_script.py). Simulated here: a torch
optimizer over the same parameters steps while ours does not; the ZeRO engines' ways of
replacing the module's tensors (flat views with equal values, ZeRO-3's empty partitions) too.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gnlorp_dist import GradNormLoRPAdamW, projected_param_groups
from gnlorp_dist.optim import never_stepped

LOGGER = "gnlorp_dist.optim.never_stepped"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def _ours(model: nn.Module) -> GradNormLoRPAdamW:
    return GradNormLoRPAdamW(
        projected_param_groups(model, rank=2, update_proj_gap=4, scale=0.25, target_modules="*"),
        lr=1e-2,
    )


def _backward(model: nn.Module) -> None:
    model(torch.randn(3, 16)).square().mean().backward()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_another_optimizer_training_our_parameters_is_logged_once(caplog):
    model = _model()
    ours = _ours(model)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            _backward(model)
            other.step()
    messages = _warnings(caplog)
    assert len(messages) == 1, messages
    assert "GradNormLoRPAdamW has not stepped, yet SGD.step()" in messages[0]
    assert "GradNormLoRPTrainer" in messages[0]
    del ours


def test_no_warning_once_our_optimizer_stepped_or_when_others_train_other_parameters(caplog):
    model, head = _model(), nn.Linear(4, 2)
    ours = _ours(model)
    other = torch.optim.SGD(head.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _backward(model)
        head(torch.randn(3, 4)).sum().backward()
        other.step()  # a second optimizer over other parameters, stepping first: fine
        ours.step()
        again = torch.optim.SGD(model.parameters(), lr=0.1)
        _backward(model)
        again.step()  # ours has stepped: nothing to say
    assert _warnings(caplog) == []
    assert ours not in never_stepped._watched


def test_engine_replacing_tensors_with_equal_values_is_not_a_change_but_partitioning_is(caplog):
    model = _model()
    ours = _ours(model)
    first, second = model[0].weight, model[2].weight
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        # ZeRO 1/2 point each weight into a flat buffer holding the same values: not a change.
        flat = torch.cat([first.detach().reshape(-1), second.detach().reshape(-1)])
        first.data = flat[: first.numel()].view_as(first)
        torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1).step()
        assert _warnings(caplog) == []
        # ZeRO-3 empties the module's tensors (each rank keeps a flat partition elsewhere).
        second.data = torch.empty(0)
        torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1).step()
    assert len(_warnings(caplog)) == 1
    del ours


def test_fingerprint_reads_only_the_first_row_and_sees_a_change_anywhere_in_it():
    param = nn.Parameter(torch.arange(40.0).reshape(5, 8).t())  # non-contiguous
    before = never_stepped.fingerprint([param])
    assert before.samples[0].numel() == 5 * 4  # the first row: 5 floats, as bytes
    assert not never_stepped.parameters_changed(before)
    with torch.no_grad():
        param[0, 4] += 1
    assert never_stepped.parameters_changed(before)
