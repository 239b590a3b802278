"""``python -m gnlorp_dist.finetune``: the same as ``gnlorp-finetune``."""

import sys

from gnlorp_dist.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
