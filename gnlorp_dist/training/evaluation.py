"""Held-out perplexity, and the check that a merged model reloads with the same logits."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from gnlorp_dist.device import autocast_context, to_device


@torch.no_grad()
def evaluate(
    model: nn.Module,
    eval_blocks: torch.Tensor,
    batch_size: int,
    max_batches: int = 0,
    autocast: str = "none",
) -> tuple[float, float]:
    """Mean next-token loss and perplexity over (up to ``max_batches`` batches of) the held-out
    blocks; every block has the same length, so block weighting is token weighting.

    Runs on the model's device (the blocks move there batch by batch), under the training
    run's ``autocast``; the losses are summed there and read once."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    count = eval_blocks.shape[0]
    if max_batches > 0:
        count = min(count, max_batches * batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, count, batch_size):
        ids = to_device(eval_blocks[start : min(start + batch_size, count)], device)
        with autocast_context(device, autocast):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        total += loss.double() * ids.shape[0]
    model.train(was_training)
    mean = float(total) / count
    return mean, math.exp(min(mean, 700.0))


@torch.no_grad()
def merged_logit_difference(model: nn.Module, final_dir: Path, ids: torch.Tensor) -> float:
    """Max |logit difference| between the trained model and its merged copy reloaded with
    stock ``transformers.AutoModelForCausalLM`` from ``final_dir``, both on the model's device."""
    device = next(model.parameters()).device
    ids = to_device(ids, device)
    reloaded = AutoModelForCausalLM.from_pretrained(str(final_dir), local_files_only=True)
    reloaded.to(device)
    reloaded.eval()
    was_training = model.training
    model.eval()
    ours = model(input_ids=ids, use_cache=False).logits.float()
    theirs = reloaded(input_ids=ids, use_cache=False).logits.float()
    model.train(was_training)
    return float((ours - theirs).abs().max())
