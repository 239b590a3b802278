"""Compare optimizers on the same small LLaMA pre-training: a thin wrapper of ``gnlorp-bench``.

python -m benchmarks.compare                 # same flags as gnlorp-bench (see --help)
"""

from __future__ import annotations

import sys

from gnlorp_dist.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
