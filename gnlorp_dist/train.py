"""``python -m gnlorp_dist.train``: gnlorp-train's command line (the launchers' entry point).

The run itself lives in :mod:`gnlorp_dist.training`; this module only keeps the short ``-m``
name that torchrun, ``deepspeed --module``, ``accelerate launch -m`` and mpirun commands use.
"""

import sys

from gnlorp_dist.training.run import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
