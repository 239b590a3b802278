"""Which gradient norm ``--grad-clip`` bounds (``--clip-norm-of``), one rule at every world size.

``consumed`` (what the optimizer consumes: each projected matrix's low-rank gradient, each dense
parameter's gradient, one global norm over the ranks) is the norm the low-rank reduction can
compute, so ``auto`` means it on one process and on N alike and the two end within 1e-4 on the
same global batch. ``full`` (torch's ``clip_grad_norm_``) stays where a rank holds the whole
gradient. The resolved rule is recorded in ``run_config.json`` and kept by a resume, on any world
size; checkpoints written before it was recorded get the rule ``auto`` meant then.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gnlorp_dist.checkpoint.store import (
    CONFIG_FILE,
    STATE_FILE,
    checkpoints_root,
    resume_candidates,
)
from gnlorp_dist.training.config import (
    RunConfig,
    canonical_grad_reduction,
    effective_grad_reduction,
)


def effective_clip_norm_of(config: RunConfig, world_size: int) -> str:
    """``--clip-norm-of`` with ``auto`` resolved; a ValueError for a norm this run cannot
    compute (the full gradient exists only on its owners once the optimizer reduces it).

    ``auto`` is one rule at every world size, so one process and N ranks on the same global
    batch clip alike: ``consumed`` for the projected optimizers (the norm the low-rank
    reduction can compute, and one process too), ``full`` for torch's AdamW (it consumes the
    full gradient, so there the two norms are the same) and under DeepSpeed (its engine clips
    the full gradient itself, "gradient_clipping")."""
    reduction = effective_grad_reduction(config, world_size)
    optimizer_reduces = world_size > 1 and reduction in ("full", "low_rank")
    if config.clip_norm_of == "full" and optimizer_reduces and config.grad_clip > 0:
        raise ValueError(
            f"--clip-norm-of full with --grad-reduction {reduction} on {world_size} processes: "
            "no rank holds the whole averaged gradient (the optimizer reduces it to owners), so "
            "its norm is unknown; use --clip-norm-of consumed, or --grad-reduction none"
        )
    if config.clip_norm_of != "auto":
        return config.clip_norm_of
    if config.optimizer == "adamw" or config.deepspeed is not None:
        return "full"
    return "consumed"


def clip_rule_before_it_was_recorded(saved: dict[str, Any], world_size: int) -> str:
    """The rule a checkpoint's run used when its ``run_config.json`` does not record it
    resolved (``saved``: that record; ``world_size``: the processes that wrote it). ``auto``
    then meant consumed only where the optimizer reduced the gradients itself (several
    processes, --grad-reduction low_rank/full, low_rank being auto's choice for a projected
    optimizer without an engine), full otherwise; before --clip-norm-of existed the loop always
    clipped the full gradient."""
    rule = saved.get("clip_norm_of")
    if rule is None:
        return "full"
    if rule != "auto":
        return rule
    reduction = canonical_grad_reduction(saved.get("grad_reduction", "auto"))
    if reduction == "auto":
        engine = saved.get("deepspeed") is not None or bool(saved.get("fsdp"))
        projected = saved.get("optimizer") != "adamw"
        reduction = "low_rank" if world_size > 1 and projected and not engine else "none"
    return "consumed" if world_size > 1 and reduction in ("full", "low_rank") else "full"


def _checkpoint_to_resume(config: RunConfig) -> Path | None:
    """The checkpoint --resume names, as gnlorp-train will pick it when it verifies (its newest
    candidate; not verified here: only two small JSON files are read, and the full check comes
    when the checkpoint is loaded). None for a fresh run."""
    if config.resume == "never":
        return None
    folder = Path(config.output_dir if config.resume == "auto" else config.resume)
    if config.resume == "auto" or checkpoints_root(folder).is_dir():
        candidates = resume_candidates(folder) if checkpoints_root(folder).is_dir() else []
        if candidates or config.resume == "auto":
            return candidates[0] if candidates else None
    return folder if (folder / STATE_FILE).is_file() else None


def _saved_clip_rule(checkpoint: Path) -> tuple[str, dict[str, Any], int] | None:
    """``(rule, record, world size)`` of ``checkpoint``'s run; None when its JSON files cannot
    be read (the checkpoint's verification then names the fault)."""
    try:
        record = json.loads((checkpoint / CONFIG_FILE).read_text())
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(state, dict):
        return None
    world_size = int(state.get("world_size", 1))
    return clip_rule_before_it_was_recorded(record, world_size), record, world_size


def resolve_clip_norm_of(
    config: RunConfig, world_size: int, log: Callable[[str], None] = print
) -> RunConfig:
    """``config`` with ``clip_norm_of`` resolved, as the run records it in ``run_config.json``
    (never ``auto``, so a resume on another world size keeps the rule).

    A resumed run keeps its checkpoint's rule: ``auto`` takes it (from a checkpoint that
    recorded ``auto``, the rule ``auto`` meant at its world size, logged); an explicit rule
    that differs is a ValueError naming both and the fix. ValueError as well for a rule this
    run cannot compute (see :func:`effective_clip_norm_of`). No clipping (--grad-clip 0, now or
    in the checkpoint's run), or per-layer updates on both sides (they clip each parameter
    whatever the flag says), make the rule moot: then nothing is compared. Under DeepSpeed the
    rule is always full."""
    checkpoint = None if config.deepspeed is not None else _checkpoint_to_resume(config)
    saved = _saved_clip_rule(checkpoint) if checkpoint is not None else None
    moot = saved is None or not config.grad_clip or not saved[1].get("grad_clip", 1.0)
    if moot or (config.per_layer and saved[1].get("per_layer")):
        return dataclasses.replace(config, clip_norm_of=effective_clip_norm_of(config, world_size))
    rule, record, saved_world = saved
    recorded = record.get("clip_norm_of")
    how = (
        f"--clip-norm-of {rule}"
        if recorded == rule
        else f"--clip-norm-of {recorded or 'absent'}, i.e. {rule} on its {saved_world} processes"
    )
    if config.clip_norm_of not in ("auto", rule):
        raise ValueError(
            f"--clip-norm-of {config.clip_norm_of}, but checkpoint {checkpoint} clipped the "
            f"{rule} gradient norm ({how}): a resumed run keeps its clipping rule, or its "
            f"trajectory changes silently. Pass --clip-norm-of {rule} (or auto, which keeps the "
            "checkpoint's rule), or start a fresh run with another --output-dir"
        )
    kept = dataclasses.replace(config, clip_norm_of=rule)
    try:
        effective_clip_norm_of(kept, world_size)
    except ValueError as err:
        raise ValueError(
            f"checkpoint {checkpoint} clipped the {rule} gradient norm ({how}), which this run "
            f"cannot compute: {err}. To keep the checkpoint's rule resume with --grad-reduction "
            "none; to clip the consumed norm instead, start a fresh run with another --output-dir"
        ) from err
    if recorded != rule:
        log(
            f"checkpoint {checkpoint} records {how} (written before the rule was recorded "
            f"resolved); this run keeps clipping the {rule} gradient norm"
        )
    return kept


def clips_full_gradient(config: RunConfig, world_size: int) -> bool:
    """Whether gnlorp-train's loop clips the whole gradient (torch's clip_grad_norm_) before the
    step; otherwise the optimizer clips what it consumes (or per-layer hooks clip per
    parameter). The rule is the resolved one (prepare() records it), the same at every world
    size; torch's AdamW, which consumes the full gradient, is always clipped by the loop."""
    return effective_clip_norm_of(config, world_size) == "full" or config.optimizer == "adamw"
