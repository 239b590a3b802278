"""Pre-training data: text sources and tokenizers (the embedded Shakespeare corpus, local files,
the default tokenizer: :mod:`~gnlorp_dist.data.corpus`), and token blocks with a held-out split
and a resumable, rank-sharded batch order, in memory or streamed from the hub
(:mod:`~gnlorp_dist.data.loader`)."""
