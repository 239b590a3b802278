"""Adapters to training engines and clients.

``gnlorp_dist.integrations.deepspeed`` (imported by ``import gnlorp_dist``; it imports DeepSpeed
itself only when a ZeRO layout is met) teaches :class:`gnlorp_dist.GradNormLoRPAdamW` the
layouts of ZeRO stages 1, 2 and 3.

``gnlorp_dist.integrations.transformers`` (imported only on request: it imports transformers)
holds the ``Trainer`` / TRL ``SFTTrainer`` entry points and the merged-model save; see
docs/clients.md.
"""
