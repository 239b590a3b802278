"""Pre-training data: the embedded and local corpora (:mod:`~gnlorp_dist.data.corpus`) and the
resumable, rank-sharded token stream (:mod:`~gnlorp_dist.data.loader`)."""
