"""The low-rank gradient reduction's one-process parts: its options, the consumed-norm clip, and
how gnlorp-train picks them. The multi-rank equivalence (2 and 3 ranks, step and per-layer
modes, bytes counted) is in tests/distributed/test_sharded_optimizer.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gnlorp_dist import GradNormLoRPAdamW
from gnlorp_dist.optim.comm import LocalCommunicator, clip_coefficient
from gnlorp_dist.optim.projection import project, projection_side
from gnlorp_dist.training.clip_rule import effective_clip_norm_of
from gnlorp_dist.training.config import RunConfig, effective_grad_reduction, resolve

RANK, GAP = 4, 10


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    projected = [nn.Parameter(torch.randn(24, 16, generator=gen)) for _ in range(2)]
    dense = [nn.Parameter(torch.randn(16, generator=gen))]
    return projected, dense


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _optimizer(projected, dense, **kwargs):
    groups = [
        {"params": projected, "rank": RANK, "update_proj_gap": GAP, "scale": 0.25,
         "proj_type": "std"},
        {"params": dense},
    ]  # fmt: skip
    return GradNormLoRPAdamW(groups, lr=0.1, eps=1.0, communicator=LocalCommunicator(), **kwargs)


def test_clip_coefficient_is_clip_grad_norms():
    tensors = [torch.full((3, 4), 2.0), torch.full((5,), -1.0)]
    norm = math.sqrt(12 * 4 + 5)
    coefficient = clip_coefficient(LocalCommunicator(), tensors, 1.5, torch.device("cpu"))
    assert coefficient.dtype == torch.float32 and coefficient.dim() == 0
    assert float(coefficient) == pytest.approx(1.5 / (norm + 1e-6), rel=1e-6)
    never_above_one = clip_coefficient(LocalCommunicator(), tensors, 1e6, torch.device("cpu"))
    assert float(never_above_one) == 1.0


def test_consumed_norm_clip_scales_what_the_update_reads():
    """At a step that is not a refresh, clipping the consumed tensors equals handing the
    optimizer gradients pre-scaled by the coefficient of the low-rank gradients' and dense
    gradients' global norm (projection is linear; eps=1 keeps Adam scale-sensitive)."""
    runs = []
    for clipped in (True, False):
        projected, dense = _params()
        optimizer = _optimizer(projected, dense)
        for param, grad in zip(projected + dense, _grads(projected + dense, 0)):
            param.grad = grad
        optimizer.step()  # the refresh: the same basis in both runs
        grads = _grads(projected + dense, 1)
        if clipped:
            optimizer.max_grad_norm = 0.3
        else:
            states = [optimizer.state[p] for p in projected]
            lows = [
                project(g, s["proj"], projection_side(g.shape, "std"))
                for g, s in zip(grads, states)
            ]
            norm = torch.cat([t.reshape(-1) for t in lows + grads[2:]]).norm()
            coefficient = min(1.0, 0.3 / (float(norm) + 1e-6))
            assert coefficient < 0.5  # the clip is active
            grads = [g * coefficient for g in grads]
        for param, grad in zip(projected + dense, grads):
            param.grad = grad
        optimizer.step()
        runs.append([p.detach().clone() for p in projected + dense])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"gradient_reduction": "lowrank"}, "gradient_reduction='lowrank'"),
        ({"gradient_reduction": "none", "reduce_gradients": True}, "contradict"),
        ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm=inf must be finite"),
    ],
)
def test_bad_reduction_options_are_refused(kwargs, named):
    projected, dense = _params()
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        _optimizer(projected, dense, **kwargs)


def test_reduce_gradients_true_is_the_full_reduction():
    projected, dense = _params()
    assert _optimizer(projected, dense, reduce_gradients=True).gradient_reduction == "full"
    assert _optimizer(projected, dense).gradient_reduction == "none"


def _config(**overrides):
    return RunConfig(**{"output_dir": "unused", **overrides})


def test_train_defaults_to_the_low_rank_reduction_with_several_processes():
    assert effective_grad_reduction(_config(), 2) == "low_rank"
    assert effective_clip_norm_of(_config(), 2) == "consumed"
    assert effective_grad_reduction(_config(), 1) == "none"
    # One clipping rule at every world size (issue #22): one process clips what the optimizer
    # consumes, as the low-rank reduction does (tests/unit/test_clip_rule.py).
    assert effective_clip_norm_of(_config(), 1) == "consumed"
    # Engines and the AdamW baseline reduce gradients themselves.
    assert effective_grad_reduction(_config(optimizer="adamw"), 2) == "none"
    assert effective_grad_reduction(_config(fsdp=True), 2) == "none"
    assert effective_grad_reduction(_config(deepspeed="ds_configs/zero2.json"), 2) == "none"
    assert effective_grad_reduction(_config(grad_reduction="none"), 2) == "none"
    assert effective_clip_norm_of(_config(grad_reduction="none"), 2) == "consumed"
    # The CLI's old spellings are deprecated aliases of the optimizer's names.
    for old, new in (("ddp", "none"), ("owners", "full"), ("lowrank", "low_rank")):
        assert _config(grad_reduction=old).grad_reduction == new
        assert effective_grad_reduction(_config(grad_reduction=old), 2) == new
    # Full stays available where a rank holds the whole averaged gradient.
    assert effective_clip_norm_of(_config(clip_norm_of="full"), 1) == "full"
    assert effective_clip_norm_of(_config(grad_reduction="none", clip_norm_of="full"), 2) == "full"


def test_train_refuses_a_norm_or_reduction_it_cannot_honour():
    with pytest.raises(ValueError, match="--clip-norm-of full with --grad-reduction low_rank"):
        effective_clip_norm_of(_config(clip_norm_of="full"), 2)
    for overrides in ({"grad_reduction": "low_rank"}, {"clip_norm_of": "consumed"}):
        with pytest.raises(ValueError, match="need a projected optimizer"):
            resolve(_config(optimizer="adamw", **overrides))
    with pytest.raises(ValueError, match="--clip-norm-of consumed with --deepspeed"):
        resolve(_config(deepspeed="ds_configs/zero2.json", clip_norm_of="consumed"))
    with pytest.raises(ValueError, match="unknown --clip-norm-of 'half'"):
        resolve(_config(clip_norm_of="half"))
