"""Adapters to training engines: where their flat partitions keep each matrix's elements.

``gnlorp_dist.integrations.deepspeed`` (imported by ``import gnlorp_dist``; it imports DeepSpeed
itself only when a ZeRO layout is met) teaches :class:`gnlorp_dist.GradNormLoRPAdamW` the
layouts of ZeRO stages 1, 2 and 3.
"""
