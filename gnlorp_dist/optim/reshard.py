"""Joining and cutting one dense parameter's row-block optimizer states (pure functions).

One routine pair, :func:`join_runs` and :func:`cut_run`, over runs of a tensor's flattened
elements, for every way a sharded state crosses world sizes: the world-size-independent
``state_dict()`` (:mod:`gnlorp_dist.optim.state_dict`) and the one-file-per-rank checkpoints
(:mod:`gnlorp_dist.distributed.sharded_state`) join and cut row blocks (runs of whole rows);
ZeRO's engine checkpoints join and cut flat runs (:mod:`gnlorp_dist.optim.fragment_state`).
A projected matrix's moments held whole by its owner move whole (bitwise, 8-bit codes
included). 8-bit moments sit on their whole tensor's block grid in every run
(:mod:`gnlorp_dist.optim.quantized`), so they are joined and cut code for code, exactly,
wherever the cuts fall (a block cut between two runs has the same agreed scale in both).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gnlorp_dist.optim.quantized import MOMENT_KEYS, MomentStore, block_span

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
    per_row = _elements_per_row(pieces[0][2], pieces[0][1] - pieces[0][0])
    moments = [
        MomentStore(dict(state), bits, offset=start * per_row).load()
        for start, _stop, state in pieces
    ]
    exp_avg = torch.cat([m for m, _v in moments])
    exp_avg_sq = torch.cat([v for _m, v in moments])
    return _step(pieces), exp_avg, exp_avg_sq


def join_states(
    pieces: list[tuple[int, int, dict[str, Any]]],
    bits: int,
    dtype: torch.dtype,
    *,
    param_numel: int | None = None,
) -> dict[str, Any]:
    """The whole dense tensor's state from its row blocks' states: :func:`join_runs` over the
    blocks' elements, the moments back in the blocks' row shape."""
    rows = [(start, stop, state) for start, stop, state in _tiling(pieces)]
    per_row = _elements_per_row(rows[0][2], rows[0][1] - rows[0][0])
    runs = [(start * per_row, (stop - start) * per_row, state) for start, stop, state in rows]
    joined = join_runs(runs, bits, dtype, param_numel=param_numel)
    shape = (rows[-1][1], *rows[0][2]["exp_avg"].shape[1:])
    for key in MOMENT_KEYS:
        joined[key] = joined[key].reshape(shape)
    return joined


def join_runs(
    pieces: list[tuple[int, int, dict[str, Any]]],
    bits: int,
    dtype: torch.dtype,
    *,
    param_numel: int | None = None,
) -> dict[str, Any]:
    """THE join: one dense tensor's state from the states of runs ``[start, start + numel)`` of
    its flattened elements that tile it from 0 (row blocks, ZeRO runs, FSDP2 rows), flat.

    8-bit runs are joined code for code, exactly (a block two runs share appears once); float
    runs are joined and, if ``param_numel`` (default: the joined size) makes the whole 8-bit,
    quantised, as the optimizer decides it.
    """
    pieces = sorted(pieces, key=lambda piece: piece[0])
    position = 0
    for start, numel, _state in pieces:
        if start != position:
            covered = [(s, s + n) for s, n, _ in pieces]
            raise ValueError(f"saved runs {covered} do not tile the parameter's elements")
        position += numel
    states = [state for _start, _numel, state in pieces]
    step = _step([(0, 0, state) for state in states])
    if all(f"{key}_absmax" in s for s in states for key in MOMENT_KEYS):
        joined: dict[str, Any] = {"step": step}
        for key in MOMENT_KEYS:
            joined[key] = torch.cat([s[key].reshape(-1) for s in states])
            scales, last_block = [], -1
            for start, numel, state in pieces:
                first, _stop = block_span(start, numel)
                # A block shared with the previous run: its agreed scale is already in.
                skip = 1 if first == last_block else 0
                scales.append(state[f"{key}_absmax"][skip:])
                last_block = block_span(start, numel)[1] - 1
            joined[f"{key}_absmax"] = torch.cat(scales)
        return joined
    moments = [
        MomentStore(dict(state), bits, offset=start).load() for start, _numel, state in pieces
    ]
    exp_avg = torch.cat([m.reshape(-1) for m, _v in moments])
    exp_avg_sq = torch.cat([v.reshape(-1) for _m, v in moments])
    return moments_state(step, exp_avg, exp_avg_sq, bits, dtype, param_numel=param_numel)


def cut_run(
    state: dict[str, Any],
    start: int,
    numel: int,
    bits: int,
    dtype: torch.dtype,
    *,
    param_numel: int | None = None,
) -> dict[str, Any]:
    """THE cut: the state of elements ``[start, start + numel)`` of a whole dense tensor's
    ``state`` (its moments flattened), flat.

    8-bit codes are cut exactly, codes and the scales of the blocks the run touches (the grid is
    the whole tensor's). Float moments of a tensor that ``param_numel`` (default: the whole
    state's size) makes 8-bit are quantised whole first, then cut, so the run's scales are the
    whole blocks', as the step would have made them.
    """
    total = state["exp_avg"].numel()
    param_numel = total if param_numel is None else param_numel
    if "exp_avg_absmax" not in state:
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state = moments_state(
            int(state["step"]), exp_avg, exp_avg_sq, bits, dtype, param_numel=param_numel
        )
        if "exp_avg_absmax" not in state:  # stays float
            return {
                "step": int(state["step"]),
                **{
                    key: state[key].reshape(-1)[start : start + numel].clone()
                    for key in MOMENT_KEYS
                },
            }
    cut: dict[str, Any] = {"step": int(state["step"])}
    first, stop = block_span(start, numel)
    for key in MOMENT_KEYS:
        cut[key] = state[key].reshape(-1)[start : start + numel].clone()
        cut[f"{key}_absmax"] = state[f"{key}_absmax"][first:stop].clone()
    return cut


def _elements_per_row(state: dict[str, Any], rows: int) -> int:
    return state["exp_avg"].numel() // max(rows, 1)


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
    assert len(steps) == 1, f"pieces of one parameter at different steps: {steps}"
    return steps.pop()


def moments_state(
    step: int,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    bits: int,
    dtype: torch.dtype,
    *,
    param_numel: int | None = None,
) -> dict[str, Any]:
    """The state of a block holding these moments, as a step would have built it there.

    8-bit or not is decided by ``param_numel`` (the whole parameter's size; default: the
    block's own), as :func:`~gnlorp_dist.optim.dense.update_dense_block` decides it. The
    tensors stay on ``exp_avg``'s device.
    """
    state: dict[str, Any] = {"step": step}
    MomentStore(state, bits, param_numel=param_numel).set_values(exp_avg.to(dtype), exp_avg_sq)
    return state


def rows_of_state(
    state: dict[str, Any],
    row_start: int,
    row_stop: int,
    bits: int,
    dtype: torch.dtype,
    *,
    param_numel: int | None = None,
) -> dict[str, Any]:
    """The state of rows ``[row_start, row_stop)`` of a whole dense tensor's ``state``:
    :func:`cut_run` over those rows' elements, the moments back in row shape."""
    codes = state["exp_avg"]
    rows = codes.shape[0] if codes.dim() else 1
    per_row = codes.numel() // max(rows, 1)
    cut = cut_run(
        state,
        row_start * per_row,
        (row_stop - row_start) * per_row,
        bits,
        dtype,
        param_numel=param_numel,
    )
    for key in MOMENT_KEYS:
        cut[key] = cut[key].reshape(row_stop - row_start, *codes.shape[1:])
    return cut
