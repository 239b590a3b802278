"""Training checkpoints: the format and its writer/reader (:mod:`~gnlorp_dist.checkpoint.store`),
the per-file manifest (:mod:`~gnlorp_dist.checkpoint.manifest`), resume branches
(:mod:`~gnlorp_dist.checkpoint.branches`), torch.distributed.checkpoint interop
(:mod:`~gnlorp_dist.checkpoint.dcp`) and the merged final model
(:mod:`~gnlorp_dist.checkpoint.merged`)."""
