"""Per-layer updates (inside the backward pass) against the normal optimizer.step() path."""

from __future__ import annotations

import copy

import pytest
import torch

from gnlorp_dist import (
    GradNormLoRPAdamW,
    PerLayerUpdates,
    apply_weight_norm,
    projected_param_groups,
)
from gnlorp_dist.optim.projection import compute_projection, projection_side, subspace_error

from .test_groups import tiny_llama


def _model_and_optimizer(seed=3, gap=3, model=None):
    model = model if model is not None else apply_weight_norm(tiny_llama(seed=seed))
    groups = projected_param_groups(model, rank=6, update_proj_gap=gap, scale=0.25)
    return model, GradNormLoRPAdamW(groups, lr=1e-2, weight_decay=0.01)


def _micro_batches(step, k):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(k)]


def _loss(model, ids, k):
    return model(input_ids=ids, labels=ids).loss / k


def _normal_step(model, opt, batches):
    opt.zero_grad()
    for ids in batches:
        _loss(model, ids, len(batches)).backward()
    opt.step()


def _per_layer_step(model, batches):
    for ids in batches:
        _loss(model, ids, len(batches)).backward()


def _max_relative_difference(a, b):
    with torch.no_grad():
        return max(float((p - q).norm() / q.norm()) for p, q in zip(a.parameters(), b.parameters()))


def test_per_layer_equals_the_normal_path_across_refreshes():
    normal, normal_opt = _model_and_optimizer()
    layered, layered_opt = _model_and_optimizer(model=copy.deepcopy(normal))
    scheduler = torch.optim.lr_scheduler.LambdaLR(layered_opt, lambda s: 1.0 / (1 + s))
    normal_scheduler = torch.optim.lr_scheduler.LambdaLR(normal_opt, lambda s: 1.0 / (1 + s))
    with PerLayerUpdates(layered_opt):
        for step in range(7):  # refreshes at 0, 3, 6
            batches = _micro_batches(step, 1)
            _normal_step(normal, normal_opt, batches)
            _per_layer_step(layered, batches)
            scheduler.step()
            normal_scheduler.step()
            assert all(p.grad is None for p in layered.parameters())
    assert _max_relative_difference(layered, normal) < 1e-6
    assert _max_relative_difference(layered, apply_weight_norm(tiny_llama(seed=3))) > 1e-3
    for p, q in zip(layered_opt.param_groups[0]["params"], normal_opt.param_groups[0]["params"]):
        assert layered_opt.state[p]["step"] == normal_opt.state[q]["step"] == 7


def test_accumulation_sums_low_rank_gradients_exactly_between_refreshes():
    normal, normal_opt = _model_and_optimizer(gap=100)
    layered, layered_opt = _model_and_optimizer(model=copy.deepcopy(normal), gap=100)
    # Step 0 (the refresh) without accumulation, so both share the subspace.
    with PerLayerUpdates(layered_opt):
        _normal_step(normal, normal_opt, _micro_batches(0, 1))
        _per_layer_step(layered, _micro_batches(0, 1))
    with PerLayerUpdates(layered_opt, accumulation_steps=3):
        for step in range(1, 5):
            batches = _micro_batches(step, 3)
            _normal_step(normal, normal_opt, batches)
            _per_layer_step(layered, batches)
            assert all(p.grad is None for p in layered.parameters())
    assert _max_relative_difference(layered, normal) < 1e-5
    assert _max_relative_difference(layered, apply_weight_norm(tiny_llama(seed=3))) > 1e-3


def test_accumulated_refresh_takes_the_first_micro_batch_subspace():
    model, opt = _model_and_optimizer(gap=2)
    probe = copy.deepcopy(model)
    batches = _micro_batches(0, 3)
    _loss(probe, batches[0], 3).backward()
    name = "model.layers.0.mlp.down_proj.direction"
    first_grad = dict(probe.named_parameters())[name].grad
    sum_probe = copy.deepcopy(model)
    for ids in batches:
        _loss(sum_probe, ids, 3).backward()
    sum_grad = dict(sum_probe.named_parameters())[name].grad

    with PerLayerUpdates(opt, accumulation_steps=3):
        _per_layer_step(model, batches)
    param = dict(model.named_parameters())[name]
    side = projection_side(param.shape, "std")
    proj = opt.state[param]["proj"]
    assert subspace_error(compute_projection(first_grad, 6, side), proj, side) < 1e-4
    assert subspace_error(compute_projection(sum_grad, 6, side), proj, side) > 1e-2
    assert opt.state[param]["step"] == 1 and "low_rank_grad_sum" not in opt.state[param]


def test_per_layer_clipping_clips_each_parameter():
    model, opt = _model_and_optimizer()
    reference, ref_opt = _model_and_optimizer(model=copy.deepcopy(model))
    with PerLayerUpdates(opt, max_grad_norm=1e-3):
        _per_layer_step(model, _micro_batches(0, 1))
    with PerLayerUpdates(ref_opt):
        _per_layer_step(reference, _micro_batches(0, 1))
    # Adam normalises the first step, so clipping shows in the moments, not the weights.
    clipped = 0
    for p, q in zip(opt.param_groups[1]["params"], ref_opt.param_groups[1]["params"]):
        assert float(opt.state[p]["exp_avg"].norm()) <= 0.1 * 1e-3 + 1e-9
        clipped += float(ref_opt.state[q]["exp_avg"].norm()) > 0.1 * 1e-3 + 1e-9
    assert clipped >= 3  # embeddings, lm_head, norms at least


def test_optimizer_step_is_refused_while_attached():
    model, opt = _model_and_optimizer()
    per_layer = PerLayerUpdates(opt)
    with pytest.raises(ValueError, match="per-layer updates are attached"):
        opt.step()
    with pytest.raises(ValueError, match="already attached"):
        PerLayerUpdates(opt)
    per_layer.remove()
    PerLayerUpdates(opt).remove()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accumulation_steps": 0}, "accumulation_steps=0"),
        ({"accumulation_steps": 2.0}, "accumulation_steps=2.0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"),
    ],
)
def test_bad_per_layer_settings(kwargs, match):
    _, opt = _model_and_optimizer()
    with pytest.raises(ValueError, match=match):
        PerLayerUpdates(opt, **kwargs)


def test_other_optimizers_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="got AdamW"):
        PerLayerUpdates(torch.optim.AdamW(model.parameters()))


def test_remove_in_the_middle_of_accumulation_is_refused():
    model, opt = _model_and_optimizer()
    per_layer = PerLayerUpdates(opt, accumulation_steps=2)
    _loss(model, _micro_batches(0, 1)[0], 2).backward()
    with pytest.raises(ValueError, match="middle of an accumulation cycle of 2"):
        per_layer.remove()
    _loss(model, _micro_batches(0, 1)[0], 2).backward()
    per_layer.remove()
