"""The optimizer's options: :class:`ProjectionOptions` and :class:`MomentOptions`.

Their field names are :class:`~gnlorp_dist.optim.GradNormLoRPAdamW`'s param-group keys (GaLore's
``rank``, ``update_proj_gap``, ``scale``, ``proj_type`` and ours), so a config, a flag and a
param group name a knob alike. ``gnlorp-train`` and :class:`GradNormLoRPConfig` (the Trainer
integration) inherit both; ``gnlorp-finetune``, ``gnlorp-bench`` and ``gnlorp-memory`` share
the fields they use (:func:`~gnlorp_dist.options.fields.shared`). In the ``optim`` layer of the
import rules: the ``integrations`` layer builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from gnlorp_dist.optim.projection import PROJ_TYPES, SVD_METHODS
from gnlorp_dist.optim.spec import OPTIMIZER_PROJ_TYPES, SECOND_MOMENTS
from gnlorp_dist.optim.vlorp import BASIS_KINDS
from gnlorp_dist.options.fields import MUST_MATCH, option

STATE_BITS: tuple[int, ...] = (32, 8)
"""``bits`` choices: float32 moments, or block-wise 8-bit ones."""

BASIS_BITS: tuple[int, ...] = (16, 8, 4)
"""``proj_bits`` choices: 16 stores the basis unquantised (the group key is then left out)."""

__all__ = [
    "BASIS_BITS",
    "OPTIMIZER_PROJ_TYPES",
    "PROJ_TYPES",
    "STATE_BITS",
    "MomentOptions",
    "ProjectionOptions",
    "projection_rank",
]


def projection_rank(rank: int | None, lora_rank: int | None, default: int) -> int:
    """The rank a run projects with: ``--rank``, else its recipe's ``default``. In LoRA mode the
    projected matrices are the adapters, of rank ``--lora-rank``: the recipe's rank is capped
    there, and an explicit ``--rank`` above it is refused (it would project onto all of each
    factor and save nothing)."""
    chosen = rank if rank is not None else default
    if lora_rank is None:
        return chosen
    if rank is not None and rank > lora_rank:
        raise ValueError(
            f"--rank {rank} exceeds --lora-rank {lora_rank}: the projected matrices are the "
            "LoRA factors; use --rank <= --lora-rank"
        )
    return min(chosen, lora_rank)


@dataclass(frozen=True, kw_only=True)
class ProjectionOptions:
    """How each projected matrix's gradient is projected: GaLore's four keys, the basis's
    storage and decomposition, lazy refresh and VLoRP's granularity and random bases. Every
    field is a param-group key that the optimizer's saved state restores, so every field is
    annotated ``MUST_MATCH``: a resume with another value is refused."""

    rank: Annotated[int | None, MUST_MATCH] = None
    """Projection rank r (default: the model's recipe; gnlorp-finetune 8, GaLore's GLUE rank;
    in LoRA mode at most --lora-rank; gnlorp-bench also uses it as the LoRA/DoRA rank unless
    --lora-rank is set)."""
    update_proj_gap: Annotated[int | None, MUST_MATCH] = None
    """Subspace refresh gap T in optimizer steps (default: the model's recipe; gnlorp-finetune
    500 pre-trained, 50 random init)."""
    scale: Annotated[float | None, MUST_MATCH] = None
    """Scale alpha of the projected update (default: the model's recipe; gnlorp-finetune 4
    pre-trained, 1 random init)."""
    proj_type: Annotated[str, MUST_MATCH] = option("std", choices=OPTIMIZER_PROJ_TYPES)
    """Which side to project: std (GaLore's rule), reverse_std, left, right (SVD bases), or
    random (gnlorp-train only, VLoRP: a seeded Gaussian/Rademacher basis on the right,
    regenerated per refresh window, never stored; see --random-basis, --projection-seed)."""
    proj_bits: Annotated[int, MUST_MATCH] = option(16, choices=BASIS_BITS)
    """Bits of the projection bases: 16 (not quantised: the gradient's dtype), 8 (INT8) or 4
    (INT4, two per byte), with one float32 scale per 128 values, restored on use (Q-GaLore's
    INT4 projections)."""
    svd_method: Annotated[str, MUST_MATCH] = option("auto", choices=SVD_METHODS)
    """How a subspace refresh decomposes the gradient: auto (randomized for matrices whose
    smaller side is >= 2048, else the exact SVD), svd, or randomized."""
    lazy_refresh_threshold: Annotated[float, MUST_MATCH] = 0.0
    """Lazy refresh: at each refresh, a subspace whose new basis overlaps the old one by at least
    this (mean squared cosine of all principal angles, in [0, 1]) doubles its gap to the next
    refresh (up to 8x --update-proj-gap); one that moved goes back to the gap. 0: the fixed gap."""
    granularity: Annotated[int, MUST_MATCH] = 1
    """VLoRP's projection granularity c: each M x N gradient is reshaped to (M c, N / c) and
    projected on the right, so the state is M c x rank; c must divide every projected matrix's
    columns. 1: GaLore's rows (see docs/vlorp.md). gnlorp-bench applies it to its granular
    methods (vlorp, vlorp-projfactor, gradnormlorp-granular) only, default 4."""
    random_basis: Annotated[str, MUST_MATCH] = option("gaussian", choices=BASIS_KINDS)
    """With --proj-type random: gaussian (N(0, 1) entries) or rademacher (+-1) bases."""
    projection_seed: Annotated[int, MUST_MATCH] = 0
    """With --proj-type random: the seed every random basis is derived from (per parameter and
    refresh window; never stored, never broadcast)."""

    def projection_group_options(self) -> dict[str, Any]:
        """The options beyond GaLore's four keys as ``projected_param_groups(**options)`` takes
        them: ``svd_method`` always, the others only when they differ from their defaults (so
        the groups stay GaLore's keys)."""
        options: dict[str, Any] = {"svd_method": self.svd_method}
        if self.proj_bits != 16:
            options["proj_bits"] = self.proj_bits
        if self.lazy_refresh_threshold > 0.0:
            options["lazy_refresh_threshold"] = self.lazy_refresh_threshold
        for name, default in (("granularity", 1), ("random_basis", "gaussian")):
            if getattr(self, name) != default:
                options[name] = getattr(self, name)
        if self.projection_seed != 0:
            options["projection_seed"] = self.projection_seed
        return options


@dataclass(frozen=True, kw_only=True)
class MomentOptions:
    """How the Adam moments of the projected (and dense) parameters are stored (their shape: a
    resume with another value is refused: ``MUST_MATCH``)."""

    bits: Annotated[int, MUST_MATCH] = option(32, choices=STATE_BITS)
    """Optimizer-state bits for gradnormlorp/galore: 32, or 8 (block-wise 8-bit moments, on
    each tensor's block grid under every engine, updated chunk by chunk). gnlorp-memory's
    default: 8 for --optimizer adamw8bit, else 32."""
    second_moment: Annotated[str, MUST_MATCH] = option("adam", choices=SECOND_MOMENTS)
    """adam (a low-rank v), or factored (ProjFactor: row and column sums of the full-shape
    squared gradient, M + N floats per matrix, Adam's eps convention)."""

    def moment_group_options(self) -> dict[str, Any]:
        """``second_moment`` for the projected group when it is not Adam's (``bits`` is the
        optimizer's keyword)."""
        return {} if self.second_moment == "adam" else {"second_moment": self.second_moment}
