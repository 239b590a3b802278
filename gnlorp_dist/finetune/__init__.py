"""``gnlorp-finetune``: sequence-classification fine-tuning (GLUE, local files) with
GradNormLoRP in full or LoRA mode, GaLore, AdamW or WeGeFT; see docs/finetune.md.

``finetune(config)`` is the programmatic entry point; ``main(argv)`` the command line.
"""

from gnlorp_dist.finetune.build import FinetuneRun, prepare
from gnlorp_dist.finetune.config import FinetuneConfig, resolve
from gnlorp_dist.finetune.loop import FinetuneResult, run_finetune


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Build and run ``config`` end to end (ValueError on user mistakes, before training)."""
    return run_finetune(prepare(config))


__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "FinetuneRun",
    "finetune",
    "prepare",
    "resolve",
    "run_finetune",
]
