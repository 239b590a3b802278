"""Training checkpoints: the format, its atomic writer and verified reader
(:mod:`~gnlorp_dist.checkpoint.store`); per-file manifests, the finite-tensor guard and the
output folder's lock (:mod:`~gnlorp_dist.checkpoint.manifest`); resume branches
(:mod:`~gnlorp_dist.checkpoint.branches`); the ``--fsdp`` layout over
``torch.distributed.checkpoint`` (:mod:`~gnlorp_dist.checkpoint.dcp`); and the merged final
model, streamed tensor by tensor (:mod:`~gnlorp_dist.checkpoint.merged`)."""
