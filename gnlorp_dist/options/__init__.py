"""One options tree for every way of configuring a run: the four console scripts
(``gnlorp-train``, ``gnlorp-finetune``, ``gnlorp-bench``, ``gnlorp-memory``), the benchmarks and
the Trainer integration's :class:`~gnlorp_dist.integrations.transformers.GradNormLoRPConfig`.

- :mod:`~gnlorp_dist.options.optimizer`: :class:`ProjectionOptions` and :class:`MomentOptions`,
  whose field names are the optimizer's param-group keys;
- :mod:`~gnlorp_dist.options.groups`: the model, device, precision, schedule, data, method, loop
  and parallelism groups;
- :mod:`~gnlorp_dist.options.fields`: how a field is declared (:func:`option`, :func:`shared`)
  and documented (:func:`field_docs`: the docstring under a field is its flag's ``--help``);
- :mod:`~gnlorp_dist.options.parser`: the one way flags are made from a config (transformers'
  ``HfArgumentParser``), with ``--config FILE`` (YAML/JSON) under the command line.

Each group is a small frozen keyword-only dataclass. A config **inherits** every group whose
fields it uses in full (``RunConfig`` inherits all of them, ``GradNormLoRPConfig`` the
optimizer's two, ``FinetuneConfig`` model and device, ``BenchConfig`` model, schedule and data)
and **shares** single fields of the others (``shared(Group, "name", default=...)``): one
definition, docstring and set of choices per option, so a flag spelled the same means the same
in every CLI (tests/unit/test_options.py checks their help and choices agree). Inheritance
rather than composition (``config.projection.rank``) because every consumer reads flat
attributes (``config.rank``), and run_config.json, checkpoints' resume checks and bench/finetune
JSON records store the config flat (``dataclasses.asdict``): inheritance keeps all of them, and
each field's value and meaning, as they were.

This package's ``__init__`` imports nothing, so the Trainer integration (a lower import layer)
can import :mod:`~gnlorp_dist.options.optimizer` without the application-level groups.
"""
