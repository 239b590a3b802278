"""Compare optimizers on the same small LLaMA pre-training: a thin wrapper of ``gnlorp-bench``.

python benchmarks/compare.py                 # same flags as gnlorp-bench (see --help)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnlorp_dist.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
