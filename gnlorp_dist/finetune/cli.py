"""``gnlorp-finetune``: fine-tune a sequence classifier with GradNormLoRP, GaLore or AdamW.

    gnlorp-finetune --train-file examples/finetune/sentiment_train.csv \\
        --validation-file examples/finetune/sentiment_validation.csv --model tiny-roberta
    gnlorp-finetune --model roberta-base --task mrpc --lora-rank 8          # online: hub model + GLUE
    gnlorp-finetune --config sst2.yaml --lr 1e-4       # options from a YAML/JSON file, flags win

User mistakes (a missing file or column, a bad flag combination) end with exit status 2 and one
line naming the value, before any training.
"""

from __future__ import annotations

import os
import sys

from gnlorp_dist.device import resolve_device
from gnlorp_dist.finetune.build import prepare
from gnlorp_dist.finetune.config import FinetuneConfig, build_parser
from gnlorp_dist.finetune.loop import run_finetune
from gnlorp_dist.options.parser import config_from_namespace, parse_namespace


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = config_from_namespace(FinetuneConfig, parse_namespace(parser, argv))
    try:
        if resolve_device(config.device).type == "cpu":
            # DeepSpeed (imported by save_pretrained) then takes its CPU accelerator without
            # probing for a GPU, also on a GPU host run with --device cpu.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        run = prepare(config)
    except (ValueError, ModuleNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    run_finetune(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
