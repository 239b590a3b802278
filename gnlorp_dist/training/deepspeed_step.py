"""``gnlorp-train --deepspeed CONFIG``: the engine, its training step, checkpoints, final weights.

The model and the optimizer are built exactly as without DeepSpeed (the model in fp32: with
``--dtype bf16`` DeepSpeed casts it and keeps fp32 masters); ``deepspeed.initialize`` then takes
them, with the JSON's ``"auto"`` values filled from the run's flags. Checkpoints are DeepSpeed's
own (``engine.save_checkpoint``: module, per-rank ZeRO partitions holding our low-rank states,
and our data position, schedule and run config as client state), in
``<output-dir>/ds_checkpoints/step-XXXXXXXX``, each ending with our ``manifest.json`` (every
file's size and sha256, written by rank 0 after every rank's files are on disk). DeepSpeed
updates its ``latest`` file before our files are written, so ``--resume auto`` ignores it: it
takes the newest tag folder whose manifest verifies, skipping others with a warning. A save that
finds a non-finite tensor on any rank writes nothing and raises ValueError on every rank.

This is gnlorp-train's own code (its run, checkpoints and schedule), beside
:mod:`gnlorp_dist.training.setup`, :mod:`gnlorp_dist.training.run` and
:mod:`gnlorp_dist.training.final_model`, which call it; what any DeepSpeed user needs (config
checks, ZeRO layouts, reshardable checkpoints) is in :mod:`gnlorp_dist.integrations.deepspeed`,
below it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from gnlorp_dist.checkpoint.branches import (
    begin_branch_if_needed,
    branch_folders,
    read_branch,
    resume_candidates,
    step_dir_name,
    step_folders,
)
from gnlorp_dist.checkpoint.manifest import (
    MANIFEST_FILE,
    model_and_optimizer_nonfinite,
    verify_manifest,
    warn,
    write_manifest,
)
from gnlorp_dist.device import to_device
from gnlorp_dist.distributed import DistributedContext
from gnlorp_dist.integrations.deepspeed.checkpoint import (
    CLIENT_STATE_FILE,
    LAYOUT_FILE,
    any_rank,
    initialize_from_checkpoint,
    read_layout,
    save_checkpoint,
)
from gnlorp_dist.integrations.deepspeed.config import (
    check_deepspeed_config,
    fill_auto_values,
)
from gnlorp_dist.training.config import RunConfig
from gnlorp_dist.training.schedule import sync_lr_to_schedule
from gnlorp_dist.training.steps import StepStats

CHECKPOINT_DIR = "ds_checkpoints"


class Run(Protocol):
    """What these functions read and set of a run: :class:`gnlorp_dist.training.setup.Run` is
    the one they get. Declared here because :mod:`gnlorp_dist.training.setup` imports this
    module (to start the engine), so this one cannot import it back."""

    config: RunConfig
    llama: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    data: Any
    context: DistributedContext
    device: torch.device
    engine: Any
    start_step: int
    resumed_from: Path | None


def accelerate_config_file() -> str | None:
    """The DeepSpeed JSON ``accelerate launch --use_deepspeed`` was given, if any.

    Raises ValueError under Accelerate's DeepSpeed plugin without a JSON file: its flag-built
    config would name Accelerate's own optimizer settings, not ours.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("true", "1"):
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        raise ValueError(
            "accelerate launch --use_deepspeed without --deepspeed_config_file: gnlorp-train "
            "needs a DeepSpeed JSON (e.g. --deepspeed_config_file ds_configs/zero2.json, or "
            "launch/accelerate_deepspeed.yaml)"
        )
    return path


def engine_config(run: Run) -> dict[str, Any]:
    """The run's DeepSpeed config: checked, ``"auto"`` values filled from its flags."""
    c = run.config
    assert c.deepspeed is not None
    filled = fill_auto_values(
        check_deepspeed_config(c.deepspeed, allow_auto=True),
        micro_batch_size=c.batch_size,
        grad_accum=c.grad_accum,
        world_size=run.context.world_size,
        grad_clip=c.grad_clip,
        bf16=c.dtype == "bf16",
    )
    return check_deepspeed_config(filled)


def start_engine(run: Run, checkpoint: Path | None = None) -> tuple[Any, dict[str, Any] | None]:
    """``deepspeed.initialize`` over the run's model and optimizer, resumed from ``checkpoint``
    (on any number of ranks) when given; the engine and the checkpoint's client state."""
    import deepspeed  # noqa: PLC0415  (5 s import; only for --deepspeed runs)

    if run.device.type == "cpu":
        # DeepSpeed's CPU shared-memory all-reduce JIT-compiles for minutes on first use;
        # the gloo group the job already has gives the same sums.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if checkpoint is None:
        engine, *_ = deepspeed.initialize(
            model=run.model, optimizer=run.optimizer, config=engine_config(run)
        )
        return engine, None
    return initialize_from_checkpoint(
        model=run.model, optimizer=run.optimizer, config=engine_config(run), checkpoint=checkpoint
    )


def describe(engine: Any, world_size: int) -> str:
    """One log line: the engine's ZeRO stage, precision, offload and world size."""
    stage = engine.zero_optimization_stage()
    offload = " + CPU optimizer offload" if engine.zero_cpu_offload() else ""
    precision = "bf16 (fp32 masters)" if engine.bfloat16_enabled() else "fp32"
    return (
        f"deepspeed: ZeRO-{stage}{offload}, {precision}, {world_size} process(es), engine "
        f"optimizer {type(engine.optimizer).__name__}"
    )


def train_step(engine: Any, scheduler: Any, micro_batches: list[torch.Tensor]) -> Any:
    """One optimizer step: DeepSpeed scales each micro-batch's loss, accumulates, clips, and
    steps the optimizer at the accumulation boundary."""

    engine.train()
    lr = engine.optimizer.param_groups[0]["lr"]
    total = torch.zeros((), dtype=torch.float32, device=engine.device)
    for ids in micro_batches:
        ids = to_device(ids, torch.device(engine.device))
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    scheduler.step()
    norm = engine.get_global_grad_norm()
    return StepStats(
        loss=float(total) / len(micro_batches),
        lr=lr,
        grad_norm=float(norm) if norm is not None and engine.gradient_clipping() > 0 else None,
    )


def save(run: Run, step: int, client_state: dict[str, Any]) -> Path:
    """A reshardable DeepSpeed checkpoint at ``step`` (every rank), keeping the newest ones."""
    c = run.config
    root = Path(c.output_dir) / CHECKPOINT_DIR
    bad = model_and_optimizer_nonfinite(run.model, run.optimizer)
    if any_rank(run.optimizer, bool(bad)):
        message = (
            f"refusing to write the checkpoint of step {step}: non-finite values"
            f"{' in ' + ', '.join(bad[:8]) if bad else ' on another rank'}. Training diverged; "
            "the previous checkpoints are kept: resume from them with a lower --lr or with "
            "--grad-clip"
        )
        logging.getLogger(__name__).error(message)
        raise ValueError(message)
    branch = read_branch(root)["branch"]
    tag = step_dir_name(step, branch)
    folder = save_checkpoint(run.engine, run.optimizer, root, tag, client_state)
    if run.context.is_main:
        write_manifest(folder, step=step, branch=branch)  # last: every rank's files are on disk
        if c.keep_checkpoints:  # the current branch's only: other branches are never pruned
            tags = branch_folders(root, _is_tag, branch)
            for old in tags[: -c.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    run.context.barrier()
    return folder


def latest(output_dir: str) -> Path | None:
    """The checkpoint DeepSpeed's ``latest`` file names, if there is one."""
    marker = Path(output_dir) / CHECKPOINT_DIR / "latest"
    if not marker.is_file():
        return None
    return marker.parent / marker.read_text().strip()


def check_tag(folder: Path) -> dict[str, Any]:
    """``folder``'s client state once its files match its manifest, or a ValueError naming the
    file at fault. A folder saved before manifests (layout and client state, no manifest) is
    used with a warning that it is unverified."""
    if verify_manifest(folder) is None:
        read_layout(folder)
        if not (folder / CLIENT_STATE_FILE).is_file():
            raise ValueError(f"{folder} has no {CLIENT_STATE_FILE}: its save did not finish")
        warn(f"DeepSpeed checkpoint {folder} has no {MANIFEST_FILE}: used unverified")
    path = folder / CLIENT_STATE_FILE
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err})") from err


def _is_tag(folder: Path) -> bool:
    return folder.is_dir()


def _is_finished(folder: Path) -> bool:
    """A tag folder whose save reached our files (a kill between DeepSpeed's files and ours
    leaves one that is not: resuming the previous one then continues the same branch)."""
    return (folder / MANIFEST_FILE).is_file() or (folder / LAYOUT_FILE).is_file()


def tag_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The current branch's tag folders under ``output_dir/ds_checkpoints``, newest first, then
    the one the branch started from (see :mod:`gnlorp_dist.checkpoint.branches`)."""
    return resume_candidates(Path(output_dir) / CHECKPOINT_DIR, _is_tag)


def select_tag(output_dir: str | os.PathLike) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest tag folder that verifies, and its client state (DeepSpeed's ``latest`` is
    ignored: it is written before our files); each one skipped is a warning naming the fault."""
    faults = []
    for folder in tag_folders(output_dir):
        try:
            return folder, check_tag(folder)
        except ValueError as err:
            faults.append(str(err))
            warn(f"skipping DeepSpeed checkpoint {folder}: {err}")
    if faults:
        raise ValueError(
            f"no DeepSpeed checkpoint in {output_dir} verifies ({'; '.join(faults)}); resume a "
            "verified one with --resume PATH, or start afresh with another --output-dir"
        )
    return None, None


def resume_point(run: Run) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint ``--resume`` names (auto: the newest verified tag folder) and its client
    state (the caller checks its ``run_config`` against the run's before anything is loaded)."""
    c = run.config
    if c.resume == "never":
        if step_folders(Path(c.output_dir) / CHECKPOINT_DIR, _is_tag):
            raise ValueError(
                f"--resume never, but {c.output_dir!r} already holds checkpoints; use --resume "
                "auto or another --output-dir"
            )
        return None, None
    source = c.output_dir if c.resume == "auto" else c.resume
    if c.resume == "auto" or (Path(c.resume) / CHECKPOINT_DIR).is_dir():
        checkpoint, state = select_tag(source)
        if checkpoint is None:
            return None, None
    else:
        checkpoint = Path(c.resume)
        state = check_tag(checkpoint)
    assert state is not None
    return checkpoint, state


def restore_client_state(run: Run, state: dict[str, Any], checkpoint: Path) -> str | None:
    """Resume the schedule, the data position and the step from ``state``. Returns the new
    branch's id when ``checkpoint`` is not the newest (rank 0; the caller logs it), else None."""
    run.scheduler.load_state_dict(state["scheduler"])
    # On another number of ranks the optimizer is new (DeepSpeed did not load its groups).
    sync_lr_to_schedule(run.scheduler)
    run.data.train.load_state_dict(state["data_state"])
    run.start_step, run.resumed_from = state["step"], checkpoint
    run.context.barrier()  # every rank chose its checkpoint before the branch may change
    if not run.context.is_main:
        return None
    root = Path(run.config.output_dir) / CHECKPOINT_DIR
    return begin_branch_if_needed(root, checkpoint, _is_finished)


def consolidated_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, in fp32, on every rank (collective: every rank must call it)."""
    return {name: full_fp32_param(param).cpu() for name, param in model.named_parameters()}


def full_fp32_param(param: torch.nn.Parameter) -> torch.Tensor:
    """One parameter whole, in fp32 (the engine's master copy where it keeps one), where the
    engine keeps it: a collective under ZeRO, so every rank calls it in the same order."""
    import deepspeed  # noqa: PLC0415
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415

    full = None
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        full = safe_get_full_fp32_param(param)  # None for frozen parameters
    if full is None and hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param]):
            full = param.data.float().clone()
    return full if full is not None else param.detach().float()
