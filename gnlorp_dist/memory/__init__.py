"""Training memory: an estimator by shape arithmetic and an exact live-tensor accounting.

- :func:`estimate_memory` (:class:`MemoryConfig` -> :class:`MemoryEstimate`): peak bytes per
  GPU by component, for any LLaMA config, without allocating the model (``gnlorp-memory``).
- :func:`measure_training_step` (-> :class:`MeasuredMemory`): the live tensor bytes of one
  real training step, its peak and the breakdown at the peak; ``torch.cuda.max_memory_allocated``
  too on a GPU. :func:`measure_config` builds and measures the setup a :class:`MemoryConfig`
  describes.
"""

from gnlorp_dist.memory.accounting import (
    LiveTensorTracker,
    MeasuredMemory,
    build_for_config,
    measure_config,
    measure_training_step,
)
from gnlorp_dist.memory.config import MemoryConfig
from gnlorp_dist.memory.estimator import COMPONENTS, MemoryEstimate, estimate_memory

__all__ = [
    "COMPONENTS",
    "LiveTensorTracker",
    "MeasuredMemory",
    "MemoryConfig",
    "MemoryEstimate",
    "build_for_config",
    "estimate_memory",
    "measure_config",
    "measure_training_step",
]
