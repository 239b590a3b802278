"""The ownership plan: pure, deterministic, balanced by state bytes and SVD work."""

from __future__ import annotations

import pytest

from gnlorp_dist import apply_weight_norm, projected_param_groups
from gnlorp_dist.models import build_model_on_meta, llama_config, model_spec
from gnlorp_dist.optim.ownership import plan_ownership, state_elements


def _llama_param_table(name):
    model = apply_weight_norm(build_model_on_meta(llama_config(name)))
    spec = model_spec(name)
    groups = projected_param_groups(model, rank=spec.rank, update_proj_gap=200, scale=0.25)
    shapes, ranks, proj_types = [], [], []
    for group in groups:
        for param in group["params"]:
            shapes.append(tuple(param.shape))
            ranks.append(group.get("rank"))
            proj_types.append(group.get("proj_type"))
    return shapes, ranks, proj_types


def _state_per_rank(shapes, ranks, proj_types, world_size):
    per_rank = [0.0] * world_size
    for block in plan_ownership(shapes, ranks, proj_types, world_size):
        i = block.param_index
        elements = state_elements(shapes[i], ranks[i], proj_types[i])
        rows = shapes[i][0] if shapes[i] else 1
        per_rank[block.owner] += elements * (block.row_stop - block.row_start) / rows
    return per_rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_llama_60m_state_is_within_15_percent_of_an_even_share(world_size):
    table = _llama_param_table("llama_60m")
    per_rank = _state_per_rank(*table, world_size)
    total = sum(state_elements(*row) for row in zip(*table))
    assert sum(per_rank) == pytest.approx(total)
    for share in per_rank:
        assert abs(share - total / world_size) <= 0.15 * total / world_size, per_rank


def test_plan_covers_every_parameter_once_and_is_deterministic():
    table = _llama_param_table("llama_nano")
    first = plan_ownership(*table, 3)
    assert first == plan_ownership(*table, 3)
    for index, shape in enumerate(table[0]):
        blocks = [b for b in first if b.param_index == index]
        rows = shape[0] if shape else 1
        assert blocks[0].row_start == 0 and blocks[-1].row_stop == rows
        assert all(a.row_stop == b.row_start for a, b in zip(blocks, blocks[1:]))
        if table[1][index] is not None:  # projected matrices are never split
            assert len(blocks) == 1 and blocks[0].whole


def test_svd_work_is_spread_over_ranks():
    shapes, ranks, proj_types = _llama_param_table("llama_60m")
    plan = plan_ownership(shapes, ranks, proj_types, 4)
    work = [0.0] * 4
    for block in plan:
        if ranks[block.param_index] is not None:
            rows, cols = shapes[block.param_index]
            work[block.owner] += rows * cols * min(rows, cols)
    assert max(work) <= 1.25 * sum(work) / 4, work


def test_one_rank_owns_everything_whole():
    table = _llama_param_table("llama_nano")
    assert all(b.owner == 0 and b.whole for b in plan_ownership(*table, 1))
