"""Joining and cutting one dense parameter's row-block optimizer states (pure functions).

Shared by the two ways a sharded state crosses world sizes: the world-size-independent
``state_dict()`` (:mod:`gnlorp_dist.optim.state_dict`) and the one-file-per-rank checkpoints
(:mod:`gnlorp_dist.distributed.sharded_state`). A projected matrix's state always moves whole
(bitwise, 8-bit codes included); only a dense tensor split in row blocks
(:mod:`gnlorp_dist.optim.ownership`) is joined and cut again. 8-bit moments are joined and cut
code for code where the row blocks start on quantisation block boundaries (a same-size round
trip is then exact); elsewhere they are dequantised, joined or cut, and quantised again, because
their block scales follow the rows they were quantised over.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.quantized import BLOCK_SIZE, MIN_8BIT_NUMEL, MOMENT_KEYS, MomentStore

TRANSIENT_KEYS = ("low_rank_grad_sum",)
"""State that only lives inside one step (per-layer micro-batch sums): never saved."""


def saved_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without its transient entries, every tensor detached onto the CPU."""
    return {
        key: value.detach().cpu() if torch.is_tensor(value) else value
        for key, value in state.items()
        if key not in TRANSIENT_KEYS
    }


def join_row_blocks(
    pieces: list[tuple[int, int, dict[str, Any]]], bits: int
) -> tuple[int, Tensor, Tensor]:
    """``(step, exp_avg, exp_avg_sq)`` of a whole dense tensor from its row blocks' states.

    ``pieces``: ``(row_start, row_stop, state)`` in any order; they must tile the rows from 0.
    The moments come back in float (8-bit codes dequantised), rows in order.
    """
    pieces = _tiling(pieces)
    moments = [MomentStore(dict(state), bits).load() for _start, _stop, state in pieces]
    exp_avg = torch.cat([m for m, _v in moments])
    exp_avg_sq = torch.cat([v for _m, v in moments])
    return _step(pieces), exp_avg, exp_avg_sq


def join_states(
    pieces: list[tuple[int, int, dict[str, Any]]], bits: int, dtype: torch.dtype
) -> dict[str, Any]:
    """The whole dense tensor's state from its row blocks' states (see :func:`join_row_blocks`).

    8-bit blocks whose quantisation blocks line up with the whole tensor's (every block but
    the last a multiple of :data:`BLOCK_SIZE` elements) are joined code for code, exactly;
    others are dequantised, joined and quantised again.
    """
    pieces = _tiling(pieces)
    states = [state for _start, _stop, state in pieces]
    aligned = all(s["exp_avg"].numel() % BLOCK_SIZE == 0 for s in states[:-1])
    if aligned and all(f"{key}_absmax" in s for s in states for key in MOMENT_KEYS):
        joined: dict[str, Any] = {"step": _step(pieces)}
        for key in MOMENT_KEYS:
            joined[key] = torch.cat([s[key] for s in states])
            joined[f"{key}_absmax"] = torch.cat([s[f"{key}_absmax"] for s in states])
        return joined
    step, exp_avg, exp_avg_sq = join_row_blocks(pieces, bits)
    return moments_state(step, exp_avg, exp_avg_sq, bits, dtype)


def _tiling(
    pieces: list[tuple[int, int, dict[str, Any]]],
) -> list[tuple[int, int, dict[str, Any]]]:
    pieces = sorted(pieces, key=lambda piece: piece[0])
    covered = [(start, stop) for start, stop, _state in pieces]
    if covered[0][0] != 0 or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise ValueError(f"saved row blocks {covered} do not tile the parameter's rows")
    return pieces


def _step(pieces: list[tuple[int, int, dict[str, Any]]]) -> int:
    steps = {int(state["step"]) for _start, _stop, state in pieces}
    assert len(steps) == 1, f"row blocks of one parameter at different steps: {steps}"
    return steps.pop()


def moments_state(
    step: int, exp_avg: Tensor, exp_avg_sq: Tensor, bits: int, dtype: torch.dtype
) -> dict[str, Any]:
    """The state of a block holding these moments, as a step would have built it there.

    Whether it is 8-bit is decided by the block's own size, as :func:`update_dense_block`
    decides it when it creates a block's moments. The tensors stay on ``exp_avg``'s device.
    """
    state: dict[str, Any] = {"step": step}
    store = MomentStore(state, bits)
    store.initialise(exp_avg.to(dtype))
    if "exp_avg_absmax" in state:
        store.store(exp_avg, exp_avg_sq)
    else:
        state["exp_avg"].copy_(exp_avg)
        state["exp_avg_sq"].copy_(exp_avg_sq)
    return state


def rows_of_state(
    state: dict[str, Any], row_start: int, row_stop: int, bits: int, dtype: torch.dtype
) -> dict[str, Any]:
    """The state of rows ``[row_start, row_stop)`` of a whole dense tensor's ``state``.

    8-bit codes are cut exactly (codes and their block scales) when the rows start and end on
    quantisation block boundaries (or end with the tensor) and the rows are big enough to be
    8-bit on their own; otherwise dequantised, cut and quantised again.
    """
    codes = state["exp_avg"]
    rows = codes.shape[0] if codes.dim() else 1
    per_row = codes.numel() // max(rows, 1)
    start, stop = row_start * per_row, row_stop * per_row
    exact = (
        "exp_avg_absmax" in state
        and start % BLOCK_SIZE == 0
        and (stop % BLOCK_SIZE == 0 or row_stop == rows)
        and stop - start >= MIN_8BIT_NUMEL
    )
    if exact:
        cut: dict[str, Any] = {"step": int(state["step"])}
        blocks = slice(start // BLOCK_SIZE, -(-stop // BLOCK_SIZE))
        for key in MOMENT_KEYS:
            cut[key] = state[key][row_start:row_stop].clone()
            cut[f"{key}_absmax"] = state[f"{key}_absmax"][blocks].clone()
        return cut
    exp_avg, exp_avg_sq = MomentStore(dict(state), bits).load()
    return moments_state(
        int(state["step"]),
        exp_avg[row_start:row_stop],
        exp_avg_sq[row_start:row_stop],
        bits,
        dtype,
    )
