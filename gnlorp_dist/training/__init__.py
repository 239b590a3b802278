"""gnlorp-train: the pre-training application built on the optimizer and its layouts.

- :mod:`~gnlorp_dist.training.config`: the run's options (``RunConfig``), its command line and
  their resolution;
- :mod:`~gnlorp_dist.training.setup`: ``prepare``: model, optimizer, schedule, data (and
  DeepSpeed's engine) for one process, resumed from a checkpoint when asked;
- :mod:`~gnlorp_dist.training.run`: the loop (``run_training``), ``train`` and the command line
  (``main``; ``python -m gnlorp_dist.train`` is the launchers' name for it);
- :mod:`~gnlorp_dist.training.steps`: one optimizer step without an engine (plain, DDP,
  FSDP2, per-layer); :mod:`~gnlorp_dist.training.deepspeed_step`: the DeepSpeed engine, its
  step, checkpoints and resume;
- :mod:`~gnlorp_dist.training.final_model`: the final evaluation and the merged model in
  ``final/``; :mod:`~gnlorp_dist.training.report`: the run's setup and memory lines;
- :mod:`~gnlorp_dist.training.schedule`, :mod:`~gnlorp_dist.training.evaluation`,
  :mod:`~gnlorp_dist.training.clip_rule`: the learning-rate schedule, held-out loss and the
  reloaded model's logits, and which gradient norm ``--grad-clip`` bounds;
- :mod:`~gnlorp_dist.training.preflight`: checks made before the first step (a writable output
  folder with room for what the run will write); :mod:`~gnlorp_dist.training.faults`: fault
  injection (``GNLORP_FAULT``) for the crash-safety tests.
"""
