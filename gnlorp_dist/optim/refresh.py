"""When a projected matrix refreshes its subspace: the fixed gap, or the lazy rule.

Fixed (GaLore, the default): at steps 0, T, 2T, ... of the matrix (``T = update_proj_gap``).

Lazy (``lazy_refresh_threshold = s`` in ``(0, 1]``; Q-GaLore's idea, measured on the whole
subspace): at each refresh the owner compares the new basis with the one it replaces by
:func:`gnlorp_dist.projection.subspace_overlap` (the mean squared cosine of ALL principal angles,
not the first singular vector's alone). A subspace that has settled (overlap >= ``s``) doubles
the gap to its next refresh, up to ``max_update_proj_gap`` (default ``8 T``); one that moved
(overlap < ``s``) goes back to ``T``. The next refresh step is kept in the state
(``next_refresh``) and travels with the basis, so every rank holding the matrix agrees on when
the next refresh (a collective) is due. Skipped refreshes are SVDs never computed.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gnlorp_dist.projection import Side, subspace_overlap

MAX_GAP_FACTOR = 8


def refresh_due(group: dict[str, Any], state: dict[str, Any]) -> bool:
    """THE refresh rule: at ``state["next_refresh"]`` once set by a refresh, else at steps 0,
    T, 2T, ... of the matrix (``T = update_proj_gap``)."""
    step = int(state.get("step", 0))
    if "next_refresh" in state:
        return step >= int(state["next_refresh"])
    return step % group["update_proj_gap"] == 0


def lazy_refresh(group: dict[str, Any]) -> bool:
    return float(group.get("lazy_refresh_threshold", 0.0)) > 0.0


def max_gap(group: dict[str, Any]) -> int:
    return int(group.get("max_update_proj_gap", MAX_GAP_FACTOR * group["update_proj_gap"]))


def next_gap(group: dict[str, Any], gap: int, overlap: float | None) -> int:
    """The gap after a refresh whose new basis overlaps the old one by ``overlap`` (None: no
    old basis, the first refresh)."""
    base = int(group["update_proj_gap"])
    threshold = float(group.get("lazy_refresh_threshold", 0.0))
    if threshold <= 0.0 or overlap is None or overlap < threshold:
        return base
    return min(2 * gap, max_gap(group))


def next_refresh_step(
    group: dict[str, Any],
    state: dict[str, Any],
    old_basis: Tensor | None,
    new_basis: Tensor,
    side: Side,
) -> int | None:
    """Lazy refresh: the step of the matrix's next refresh, decided at this one on the owner
    (``state`` records the gap and the overlap measured, for reports). None under the fixed
    gap, whose rule needs no state."""
    step = int(state.get("step", 0))
    if not lazy_refresh(group):
        return None
    overlap = None
    if old_basis is not None:
        # One host read per refresh (the SVD before it synchronised already).
        overlap = float(subspace_overlap(old_basis, new_basis, side))
        state["subspace_overlap"] = overlap
    gap = next_gap(group, int(state.get("proj_gap", group["update_proj_gap"])), overlap)
    state["proj_gap"] = gap
    return step + gap


def keep_next_refresh(state: dict[str, Any], next_step: int | None) -> None:
    if next_step is not None:
        state["next_refresh"] = next_step
