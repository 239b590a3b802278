"""The end of a ``gnlorp-train`` run: the held-out evaluation and the merged model in ``final/``.

After the last step :func:`save_final_model` evaluates the trained model, streams its merged
weights to ``<output-dir>/final`` (rank 0 writes; :mod:`gnlorp_dist.checkpoint.merged`) and
checks that the folder reloads in stock ``transformers`` with the same logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gnlorp_dist.checkpoint.merged import (
    model_logits,
    reloaded_logit_difference,
    save_merged_streamed,
)
from gnlorp_dist.training import deepspeed_step
from gnlorp_dist.training.config import config_record
from gnlorp_dist.training.evaluation import evaluate, merged_logit_difference
from gnlorp_dist.training.setup import Run, log, merged_dtype


@dataclass(frozen=True, kw_only=True)
class FinalModel:
    """What :func:`save_final_model` measured and wrote."""

    eval_loss: float
    """Held-out loss of the trained model."""
    eval_perplexity: float
    """``exp(eval_loss)``."""
    final_dir: Path | None
    """The merged model folder (save_pretrained + tokenizer); None on ranks other than 0."""
    merged_max_abs_logit_diff: float
    """Trained model vs the reloaded merged model, on held-out blocks; NaN on ranks other
    than 0."""


def save_final_model(run: Run, step: int) -> FinalModel:
    """Evaluate, then stream the merged model to ``output_dir/final`` (rank 0 writes), recording
    ``step`` in its ``gnlorp_train.json``.

    A sharded model (DeepSpeed, FSDP2) is evaluated as it is, on every rank, and its merged
    weights are gathered one module at a time (:mod:`gnlorp_dist.checkpoint.merged`): no whole
    second model on the host beside the engine's copy. Under DeepSpeed they are merged from the
    fp32 masters and saved in the run's ``--dtype``. The optimizer state is dropped first (the
    final checkpoint holds it): a finished run keeps none."""
    c = run.config
    sharded = run.engine is not None or c.fsdp
    if run.engine is not None:
        run.optimizer.state.clear()
        run.model.zero_grad(set_to_none=True)
    loss, ppl = evaluate(run.model, run.data.eval_blocks, c.batch_size, c.eval_batches, c.autocast)
    log(f"eval @ step {step} | loss {loss:.4f} | perplexity {ppl:.2f}")
    sample = run.data.eval_blocks[: min(2, run.data.eval_blocks.shape[0])]
    ours = model_logits(run.model, sample) if sharded else None  # a collective forward when sharded
    info = {
        "step": step,
        "eval_loss": loss,
        "eval_perplexity": ppl,
        "run_config": config_record(c, run.llama),
    }
    final, difference = _write_merged(run, info, sample, ours)
    return FinalModel(
        eval_loss=loss,
        eval_perplexity=ppl,
        final_dir=final,
        merged_max_abs_logit_diff=difference,
    )


def _write_merged(
    run: Run, info: dict[str, Any], sample: torch.Tensor, ours: torch.Tensor | None
) -> tuple[Path | None, float]:
    """Stream the merged model to ``output_dir/final`` with ``info`` as its
    ``gnlorp_train.json`` (every rank gathers, rank 0 writes), then on rank 0 reload it and
    compare its logits on ``sample`` with ``ours`` (None: the model's own, computed here).
    ``(folder, max |logit diff|)`` on rank 0, ``(None, NaN)`` on the others."""
    # Deferred: a module-level import of transformers outside the modules that build models is
    # refused (tests/unit/test_import_rules.py), and only this function needs its logging.
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    c = run.config
    hf_logging.disable_progress_bar()
    try:
        final = save_merged_streamed(
            run.model,
            c.output_dir,
            gather=_whole_parameter(run),
            dtype=merged_dtype(c),
            device=run.device,
            merge=c.optimizer == "gradnormlorp",
            tokenizer=run.data.tokenizer,
            info=info,
            write=run.context.is_main,
        )
        if not run.context.is_main:  # every rank took part in the gathers; rank 0 wrote
            run.context.barrier()
            return None, math.nan
        assert final is not None
        if ours is None:
            difference = merged_logit_difference(run.model, final, sample)
        else:
            difference = reloaded_logit_difference(ours, final, sample)
    finally:
        hf_logging.enable_progress_bar()
    log(
        "merged model reloads with transformers.AutoModelForCausalLM: max |logit diff| "
        f"{difference:.2e}"
    )
    run.context.barrier()
    return final, difference


def _whole_parameter(run: Run) -> Callable[[torch.nn.Parameter], torch.Tensor]:
    """How the merged writer gathers one parameter whole (a collective when sharded)."""
    if run.engine is not None:
        return deepspeed_step.full_fp32_param
    # An FSDP2 parameter is a DTensor of row shards: all-gathered one at a time.
    return lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
