"""gnlorp-train: the pre-training application built on the optimizer and its layouts.

- :mod:`~gnlorp_dist.training.config`: the run's options (``RunConfig``) and their resolution;
- :mod:`~gnlorp_dist.training.setup`: model, optimizer, engine and data for one process;
- :mod:`~gnlorp_dist.training.run`: the loop (``run_training``) and the command line (``main``);
- :mod:`~gnlorp_dist.training.steps`, :mod:`~gnlorp_dist.training.deepspeed_step`: one
  optimizer step for the plain/FSDP2 and DeepSpeed paths;
- :mod:`~gnlorp_dist.training.schedule`, :mod:`~gnlorp_dist.training.evaluation`,
  :mod:`~gnlorp_dist.training.clip_rule`: learning rate, held-out loss, gradient clipping;
- :mod:`~gnlorp_dist.training.preflight`, :mod:`~gnlorp_dist.training.faults`: checks made
  before any work, and what happens when a step or a process fails.
"""
