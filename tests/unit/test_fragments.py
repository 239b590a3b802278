"""The flat-run math of ZeRO layouts, one process: runs cut anywhere give the whole-matrix math.

Every projected update under ZeRO 1/2/3 is assembled from these functions; here each is checked
against the unflattened projection on runs that start and end inside rows, and the state
merge/re-cut that carries a checkpoint from N ranks to M is checked on synthetic shards.
"""

from __future__ import annotations

import pytest
import torch

from gnlorp_dist.integrations.deepspeed import check_deepspeed_config, fill_auto_values
from gnlorp_dist.optim.fragment_state import merge_flattened_states
from gnlorp_dist.optim.fragments import (
    back_project_fragment,
    covering_rows,
    project_fragment,
    rows_block,
    run_of_rows,
)
from gnlorp_dist.optim.projection import compute_projection, low_rank_shape, project, project_back


def _cuts(numel, parts, seed):
    """``parts`` contiguous runs covering ``numel`` elements, boundaries anywhere."""
    gen = torch.Generator().manual_seed(seed)
    inner = sorted(torch.randperm(numel - 1, generator=gen)[: parts - 1].add(1).tolist())
    bounds = [0, *inner, numel]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]


def test_covering_rows_and_blocks_round_trip():
    assert covering_rows(0, 6, 3) == (0, 2)
    assert covering_rows(4, 1, 3) == (1, 2)
    assert covering_rows(2, 5, 3) == (0, 3)
    values = torch.arange(1.0, 6.0)
    block = rows_block(values, start=2, numel=5, cols=3)
    assert block.tolist() == [[0, 0, 1], [2, 3, 4], [5, 0, 0]]
    assert torch.equal(run_of_rows(block, 2, 5), values)


@pytest.mark.parametrize("shape", [(13, 7), (7, 13), (9, 9)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_runs_sum_to_the_whole_projection_and_back(shape, side):
    torch.manual_seed(0)
    grad = torch.randn(shape, dtype=torch.float64)
    proj = compute_projection(grad, 3, side)
    direction = torch.randn(low_rank_shape(shape, 3, side), dtype=torch.float64)
    flat_grad = grad.reshape(-1)
    whole_back = project_back(direction, proj, side).reshape(-1)
    for seed in range(5):
        total = torch.zeros(low_rank_shape(shape, 3, side), dtype=torch.float64)
        for start, numel in _cuts(grad.numel(), parts=4, seed=seed):
            run = flat_grad[start : start + numel]
            project_fragment(run, start, numel, shape, proj, side, total)
            back = back_project_fragment(direction, start, numel, shape, proj, side)
            torch.testing.assert_close(back, whole_back[start : start + numel])
        torch.testing.assert_close(total, project(grad, proj, side))


def test_merge_joins_dense_runs_and_keeps_owned_moments():
    exp_avg = torch.arange(10.0)
    shards = [
        {
            "w": {"step": 3, "proj": torch.ones(2, 4), "exp_avg": torch.ones(5, 2)},
            "b": {"step": 3, "run": [0, 4], "exp_avg": exp_avg[:4], "exp_avg_sq": exp_avg[:4]},
        },
        {
            "w": {"step": 3, "proj": torch.ones(2, 4)},
            "b": {"step": 3, "run": [4, 6], "exp_avg": exp_avg[4:], "exp_avg_sq": exp_avg[4:]},
        },
    ]
    merged = merge_flattened_states(shards)
    assert torch.equal(merged["b"]["dense_exp_avg"], exp_avg)
    assert merged["w"]["step"] == 3 and torch.equal(merged["w"]["exp_avg"], torch.ones(5, 2))
    shards[1]["b"]["run"] = [5, 5]  # a gap: element 4 is in no saved run
    with pytest.raises(ValueError, match=r"saved runs \[\(0, 4\), \(5, 10\)\] do not tile"):
        merge_flattened_states(shards)


# ----------------------------------------------------------------------------- config checks

BASE = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimizer": {"type": "AdamW"}}, "names an optimizer ('AdamW')"),
        ({"fp16": {"enabled": True}}, 'use "bf16"'),
        ({"zero_optimization": {"stage": 4}}, "stage=4 is not a ZeRO stage"),
        (
            {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
            "offload_optimizer at stage 1 is not supported; use stage 2 or 3",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
            "device='nvme' is not supported",
        ),
        ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}, "ZeRO++"),
        ({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, "elastic_checkpoint"),
        ({"gradient_accumulation_steps": "auto"}, 'still has "auto" values at'),
    ],
)
def test_unsupported_settings_are_refused_with_the_fix(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_deepspeed_config({**BASE, **change})


def test_client_optimizer_switches_are_filled_in():
    offload = {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    checked = check_deepspeed_config({**BASE, "zero_optimization": offload})
    assert checked["zero_allow_untested_optimizer"] is True
    assert checked["zero_force_ds_cpu_optimizer"] is False
    assert "zero_allow_untested_optimizer" not in check_deepspeed_config(
        {**BASE, "zero_optimization": {"stage": 0}}
    )


def test_auto_values_are_filled_from_the_run_and_conflicts_refused():
    config = {"train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}
    filled = fill_auto_values(
        config, micro_batch_size=2, grad_accum=3, world_size=4, grad_clip=1.0, bf16=True
    )
    assert filled["train_batch_size"] == 24 and filled["gradient_accumulation_steps"] == 3
    assert filled["gradient_clipping"] == 1.0 and filled["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 but the run uses 2"):
        fill_auto_values(
            {"train_micro_batch_size_per_gpu": 8},
            micro_batch_size=2,
            grad_accum=1,
            world_size=1,
            grad_clip=0.0,
            bf16=False,
        )
