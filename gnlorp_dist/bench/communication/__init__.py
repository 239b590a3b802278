"""Bytes on the wire per optimizer step: DDP + AdamW, ZeRO-2 + AdamW, GradNormLoRP uncompressed
and with low-rank gradient communication (issue #13); ``python -m benchmarks.communication``.

Schemes (every ratio is against ``ddp-adamw`` on the same model and world size, same run):

- ``ddp-adamw``: ``DistributedDataParallel`` + ``torch.optim.AdamW`` on the plain model;
- ``zero2-adamw``: DeepSpeed ZeRO-2 + ``torch.optim.AdamW`` (:mod:`.zero2`), default ZeRO
  settings. DeepSpeed 0.19 then all-reduces every gradient bucket
  (``"use_multi_rank_bucket_allreduce": true``, its default) and all-gathers the updated fp32
  partitions' parameters: 1.5x DDP's bytes. Counted at ``torch.distributed`` (DeepSpeed's
  ``deepspeed.comm`` calls it). The computed rows add ``zero2-rs``, the reduce-scatter variant;
- ``ours-ddp``: DDP + ``GradNormLoRPAdamW`` (weight-normalised model): DDP all-reduces every full
  gradient, then each owner broadcasts the weights it updated ("uncompressed");
- ``ours-full``: ``GradNormLoRPAdamW(gradient_reduction="full")`` (before that name existed:
  ``reduce_gradients=True``), model not in DDP: full gradient blocks reduced to their owners;
- ``ours-lowrank``: ``GradNormLoRPAdamW(gradient_reduction="low_rank")``, model not in DDP:
  between refreshes only the projected ``M x r`` / ``r x N`` gradients are reduced to each
  matrix's owner and the low-rank direction broadcast back; at a refresh the full gradient is
  reduced to the owner and the new basis broadcast; dense tensors as ZeRO-1 (row blocks reduced
  to owners, updated rows broadcast). A projected matrix's low-rank gradients, refresh gradients
  and directions travel in the weights' dtype, its bases in float32 (``--dtype bf16`` measures
  it; before commit "sends in the weights' dtype" everything projected went in float32).
  Skipped with a note while the installed ``gnlorp_dist`` has no ``gradient_reduction`` argument;
- ``ours-lowrank-narrow`` (computed only): the same with the bases in the weights' dtype too
  (not implemented: a bf16 basis would lose the subspace's precision).

The modules, by responsibility:

- :mod:`.schemes`: the schemes, shapes, recipes and fixed byte counts;
- :mod:`.shapes` and :mod:`.payloads`: computed (shapes only, no run): the per-step payloads from
  the parameter shapes (the real weight-normalised model and ``projected_param_groups`` built on
  the meta device) and wire bytes with the ring model, for the measured shapes and for
  ``llama_1b`` and ``llama_7b`` (rank 1024, gap 200);
- :mod:`.measure` (one launch of forked gloo ranks: the loopback byte counter and the collective
  counters of :mod:`gnlorp_dist.distributed.counting`), :mod:`.zero2`, :mod:`.calibration`
  (gloo's loopback bytes per payload byte);
- :mod:`.summary` (rows, ratios, cross-checks), :mod:`.tables` (the printed text),
  :mod:`.report` (both sections end to end), :mod:`.config` (the command line's options).

Measured windows: ``--warmup`` steps, then ``--steps`` steps measured one by one; projected
groups refresh every ``--run-gap`` steps in the run (default 3: refreshes at steps 0 and 3), so
the window holds plain steps and one refresh step, told apart by ``refresh_count``. The per-step
average at the recipe's gap T is then ``(refresh + (T - 1) * plain) / T``; "plain" is a window
without a refresh.

The shape arithmetic is exported here (``benchmarks/scale_model.py`` prices it on a cluster).
"""

from gnlorp_dist.bench.communication.payloads import (
    Payload,
    computed_payload,
    payload,
    ring_factor,
    ring_wire_bytes,
    window_average,
)
from gnlorp_dist.bench.communication.schemes import (
    COMPUTED_SCHEMES,
    DDP_ADAMW,
    OPS,
    OURS_DDP,
    OURS_FULL,
    OURS_LOW_RANK,
    OURS_LOW_RANK_NARROW,
    SCHEMES,
    ZERO2_ADAMW,
    ZERO2_TEXTBOOK,
    model_config,
    recipe,
)
from gnlorp_dist.bench.communication.shapes import (
    TensorShape,
    shapes_from_config,
    shapes_from_model,
)

__all__ = [
    "COMPUTED_SCHEMES",
    "DDP_ADAMW",
    "OPS",
    "OURS_DDP",
    "OURS_FULL",
    "OURS_LOW_RANK",
    "OURS_LOW_RANK_NARROW",
    "SCHEMES",
    "ZERO2_ADAMW",
    "ZERO2_TEXTBOOK",
    "Payload",
    "TensorShape",
    "computed_payload",
    "model_config",
    "payload",
    "recipe",
    "ring_factor",
    "ring_wire_bytes",
    "shapes_from_config",
    "shapes_from_model",
    "window_average",
]
