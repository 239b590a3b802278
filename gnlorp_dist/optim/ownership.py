"""Which rank owns which optimizer state: a pure plan, the same on every rank.

Units of ownership:

- a projected matrix is owned WHOLE by one rank (its SVD needs the whole gradient); matrices are
  placed longest-processing-time first on the least loaded rank, where a matrix's load is its
  share of the job's low-rank state bytes plus its share of the job's SVD work
  (``M·N·min(M, N)``), so both memory and refresh time balance;
- a dense parameter (AdamW is element-wise) with at least ``world_size`` rows and
  :data:`SPLIT_MIN_NUMEL` elements is split into ``world_size`` row blocks, block ``r`` owned by
  rank ``r`` (embeddings and ``lm_head`` would otherwise dominate one rank);
- a smaller dense parameter is owned whole, placed like a matrix by its state bytes.

The plan depends only on shapes, groups and the world size, so every rank computes it alone
and they agree; a checkpoint records it and can be re-planned for another world size.
"""

from __future__ import annotations

from dataclasses import dataclass

from gnlorp_dist.optim.projection import low_rank_shape, projection_side

SPLIT_MIN_NUMEL = 1 << 16


@dataclass(frozen=True, kw_only=True)
class OwnedBlock:
    """One unit of optimizer state and the rank that owns it."""

    param_index: int
    """Position of the parameter in the optimizer's flattened param_groups."""
    owner: int
    """The rank that holds this unit's state, updates it and broadcasts the result."""
    row_start: int
    """First row of the block (0 for a whole tensor)."""
    row_stop: int
    """One past the last row (the tensor's row count for a whole tensor)."""
    whole: bool
    """True when the block is the whole tensor."""


def state_elements(shape: tuple[int, ...], rank: int | None, proj_type: str | None) -> int:
    """Adam state elements (both moments) of a parameter: low-rank if ``rank`` is given."""
    if rank is None:
        numel = 1
        for size in shape:
            numel *= size
        return 2 * numel
    assert len(shape) == 2 and proj_type is not None
    rows, cols = low_rank_shape(shape, rank, projection_side(shape, proj_type))
    return 2 * rows * cols


def plan_ownership(
    shapes: list[tuple[int, ...]],
    ranks: list[int | None],
    proj_types: list[str | None],
    world_size: int,
) -> list[OwnedBlock]:
    """Ownership blocks for parameters of ``shapes`` (``ranks[i]`` None for a dense one)."""
    assert len(shapes) == len(ranks) == len(proj_types)
    assert world_size >= 1
    blocks: list[OwnedBlock] = []
    load = [0.0] * world_size
    total_state = sum(state_elements(s, r, t) for s, r, t in zip(shapes, ranks, proj_types))
    total_svd = sum(_svd_work(s) for s, r in zip(shapes, ranks) if r is not None) or 1
    whole_units: list[tuple[float, int]] = []
    for index, (shape, rank, proj_type) in enumerate(zip(shapes, ranks, proj_types)):
        rows = shape[0] if shape else 1
        numel = state_elements(shape, None, None) // 2
        share = state_elements(shape, rank, proj_type) / max(total_state, 1)
        if rank is None and world_size > 1 and rows >= world_size and numel >= SPLIT_MIN_NUMEL:
            bounds = _row_bounds(rows, world_size)
            for owner, (start, stop) in enumerate(bounds):
                blocks.append(
                    OwnedBlock(
                        param_index=index, owner=owner, row_start=start, row_stop=stop, whole=False
                    )
                )
                load[owner] += share * (stop - start) / rows
            continue
        cost = share + (_svd_work(shape) / total_svd if rank is not None else 0.0)
        whole_units.append((cost, index))
    # Longest first, ties by index, onto the least loaded rank (lowest rank on ties).
    for cost, index in sorted(whole_units, key=lambda unit: (-unit[0], unit[1])):
        owner = min(range(world_size), key=lambda r: (load[r], r))
        load[owner] += cost
        rows = shapes[index][0] if shapes[index] else 1
        blocks.append(
            OwnedBlock(param_index=index, owner=owner, row_start=0, row_stop=rows, whole=True)
        )
    blocks.sort(key=lambda b: (b.param_index, b.row_start))
    return blocks


def _svd_work(shape: tuple[int, ...]) -> float:
    rows, cols = shape
    return float(rows) * cols * min(rows, cols)


def _row_bounds(rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous row ranges covering ``rows``, sizes differing by at most one."""
    base, extra = divmod(rows, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
