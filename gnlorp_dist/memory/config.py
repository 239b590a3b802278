"""The setup an estimate (or a measurement) of training memory is for: :class:`MemoryConfig` and
the values its fields may take.

Below both :mod:`~gnlorp_dist.memory.arithmetic` (whose byte sizes read a config) and
:mod:`~gnlorp_dist.memory.estimator` (which builds on the arithmetic): the config is what they
share, so neither has to import the other's module to name it.

The fields gnlorp-train has too (model, optimizer, bits, rank, proj_type, per_layer, seq_len,
dtype, activation_checkpointing, world_size, proj_bits, second_moment, svd_method) are the
option groups' fields of :mod:`gnlorp_dist.options` (:func:`~gnlorp_dist.options.fields.shared`):
one docstring, one set of choices, the same ``--help`` in ``gnlorp-memory`` as in the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gnlorp_dist.optim.projection import SVD_METHODS
from gnlorp_dist.options.fields import shared
from gnlorp_dist.options.groups import (
    DataOptions,
    MethodOptions,
    ModelOptions,
    ParallelOptions,
    PrecisionOptions,
)
from gnlorp_dist.options.optimizer import BASIS_BITS, PROJ_TYPES, MomentOptions, ProjectionOptions

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp32": 4}
"""Bytes per element of each supported weight dtype."""

PROJ_BITS: tuple[int, ...] = BASIS_BITS
"""Bits of a stored projection basis, as ``gnlorp-train --proj-bits``: 16 is the float basis in
the gradient's dtype (4 bytes an element in fp32 runs, 2 in bf16); 8 and 4 are the codes of
:mod:`gnlorp_dist.optim.quantized_basis`."""

OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "galore", "gradnormlorp")
"""``adamw``: ``torch.optim.AdamW`` (``bits=8``: bitsandbytes' ``AdamW8bit``); ``adamw8bit``:
bitsandbytes' ``AdamW8bit``; ``galore``: :class:`GradNormLoRPAdamW` on the plain model (weight
norm off); ``gradnormlorp``: the same optimizer on the weight-normalised model."""

PER_LAYER_OPTIMIZERS: tuple[str, ...] = ("galore", "gradnormlorp")


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """One training setup whose peak memory per GPU
    :func:`~gnlorp_dist.memory.estimator.estimate_memory` computes."""

    model: str = shared(ModelOptions, "model", default=dataclasses.MISSING)
    optimizer: str = shared(MethodOptions, "optimizer", choices=OPTIMIZERS)
    bits: int | None = shared(MomentOptions, "bits", default=None)
    rank: int | None = shared(ProjectionOptions, "rank")
    proj_type: str = shared(ProjectionOptions, "proj_type", choices=PROJ_TYPES)
    per_layer: bool = shared(ParallelOptions, "per_layer")
    accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    tokens: int = 256
    """Tokens per micro-batch per GPU (batch size times sequence length)."""
    seq_len: int | None = shared(DataOptions, "seq_len", default=None)
    dtype: str = shared(PrecisionOptions, "dtype", default="bf16")
    activation_checkpointing: bool = shared(ParallelOptions, "activation_checkpointing")
    world_size: int = shared(ParallelOptions, "world_size", default=1)
    shard_states: bool = False
    """Each rank keeps the optimizer states (and projection matrices) of the matrices it owns:
    modelled as an even 1/world_size split (owners are balanced by bytes)."""
    refresh: bool = True
    """Include a subspace refresh (SVD workspace) in the step: every update_proj_gap-th step has
    one, so it sets the peak of a run (--no-refresh: the peak of the other steps)."""
    proj_bits: int = shared(ProjectionOptions, "proj_bits")
    second_moment: str = shared(MomentOptions, "second_moment")
    svd_method: str = shared(ProjectionOptions, "svd_method")

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not known; use one of {OPTIMIZERS}")
        if self.bits not in (None, 8, 32):
            raise ValueError(f"bits={self.bits!r} is not supported; use 8 or 32")
        if self.optimizer == "adamw8bit" and self.bits == 32:
            raise ValueError("optimizer='adamw8bit' with bits=32: use optimizer='adamw' instead")
        if self.proj_bits not in PROJ_BITS:
            raise ValueError(
                f"proj_bits={self.proj_bits!r} is not supported; use one of {PROJ_BITS}"
            )
        if self.second_moment not in ("adam", "factored"):
            raise ValueError(
                f"second_moment={self.second_moment!r} is not supported; use 'adam' or 'factored'"
            )
        if self.svd_method not in SVD_METHODS:
            raise ValueError(
                f"svd_method={self.svd_method!r} is not supported; use one of {SVD_METHODS}"
            )
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(
                f"dtype={self.dtype!r} is not supported; use one of {list(DTYPE_BYTES)}"
            )
        for name in ("tokens", "accumulation_steps", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.seq_len is not None and (self.seq_len < 1 or self.tokens % self.seq_len):
            raise ValueError(
                f"seq_len={self.seq_len!r} must be a positive divisor of tokens={self.tokens}"
            )
        if self.rank is not None and (isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive integer")
        if self.per_layer and self.optimizer not in PER_LAYER_OPTIMIZERS:
            raise ValueError(
                f"per_layer=True with optimizer={self.optimizer!r}: per-layer updates need "
                f"GradNormLoRPAdamW's per-parameter step; use one of {PER_LAYER_OPTIMIZERS}"
            )

    @property
    def state_bits(self) -> int:
        if self.bits is not None:
            return self.bits
        return 8 if self.optimizer == "adamw8bit" else 32

    @property
    def projected(self) -> bool:
        return self.optimizer in PER_LAYER_OPTIMIZERS
