"""One options tree (issue #22 item 3): the four CLIs' flags come from the same option groups, so
a flag spelled the same means the same everywhere; ``--config FILE`` works on every CLI."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gnlorp_dist.bench.cli import build_parser as bench_parser
from gnlorp_dist.bench.cli import config_from_args as bench_config
from gnlorp_dist.bench.config import BenchConfig
from gnlorp_dist.finetune.config import FinetuneConfig
from gnlorp_dist.finetune.config import build_parser as finetune_parser
from gnlorp_dist.finetune.config import config_from_args as finetune_config
from gnlorp_dist.integrations.transformers import (
    GradNormLoRPConfig,
    gnlorp_optimizer_cls_and_kwargs,
)
from gnlorp_dist.memory.cli import build_parser as memory_parser
from gnlorp_dist.memory.cli import config_from_args as memory_config
from gnlorp_dist.memory.cli import main as memory_main
from gnlorp_dist.memory.config import MemoryConfig
from gnlorp_dist.options.fields import field_docs
from gnlorp_dist.options.optimizer import MomentOptions, ProjectionOptions
from gnlorp_dist.options.parser import parse_namespace
from gnlorp_dist.training.config import RunConfig
from gnlorp_dist.training.config import build_parser as train_parser
from gnlorp_dist.training.config import config_from_args as train_config

PARSERS = {
    "gnlorp-train": train_parser,
    "gnlorp-finetune": finetune_parser,
    "gnlorp-bench": bench_parser,
    "gnlorp-memory": memory_parser,
}

# Flags whose choices differ between CLIs, and why (each CLI's help says which it takes).
DIFFERENT_CHOICES = {
    "--optimizer": "gnlorp-finetune also trains wegeft; gnlorp-memory also prices adamw8bit",
    "--proj-type": "random bases (VLoRP) are wired into gnlorp-train's optimizer only",
}


def _flags(parser) -> dict[str, tuple[str, tuple | None, object]]:
    """``{--flag: (help, choices, default)}`` over the flags' dashed long spellings."""
    flags = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and "_" not in flag and flag != "--help":
                choices = tuple(action.choices) if action.choices is not None else None
                flags[flag] = (action.help, choices, action.default)
    return flags


def _shared_flags() -> dict[str, dict[str, tuple]]:
    per_cli = {name: _flags(build()) for name, build in PARSERS.items()}
    every = {flag for flags in per_cli.values() for flag in flags}
    shared = {}
    for flag in sorted(every):
        holders = {cli: flags[flag] for cli, flags in per_cli.items() if flag in flags}
        if len(holders) > 1:
            shared[flag] = holders
    return shared


def test_every_flag_shared_by_two_clis_has_the_same_help_and_choices():
    shared = _shared_flags()
    # The flags the issue found spelled alike with different meanings are among them.
    for flag in ("--device", "--tf32", "--dtype", "--rank", "--proj-type", "--bits", "--seed"):
        assert flag in shared, flag
    for flag, holders in shared.items():
        helps = {cli: text for cli, (text, _, _) in holders.items()}
        assert len(set(helps.values())) == 1, f"{flag}: help differs between {sorted(helps)}"
        choices = {cli: c for cli, (_, c, _) in holders.items()}
        if flag not in DIFFERENT_CHOICES:
            assert len(set(choices.values())) == 1, f"{flag}: choices differ: {choices}"


def test_a_default_that_differs_between_clis_is_documented_in_the_help():
    for flag, holders in _shared_flags().items():
        defaults = {repr(default) for _, _, default in holders.values()}
        if len(defaults) > 1:
            text = next(iter(holders.values()))[0]
            assert "default" in text, f"{flag}: defaults {defaults} differ, the help says none"


def test_the_different_choices_are_documented_in_the_shared_help():
    shared = _shared_flags()
    optimizer = next(iter(shared["--optimizer"].values()))[0]
    assert (
        "gnlorp-finetune also wegeft" in optimizer and "gnlorp-memory also adamw8bit" in optimizer
    )
    assert "random (gnlorp-train only" in next(iter(shared["--proj-type"].values()))[0]


@pytest.mark.parametrize("config_type", [RunConfig, FinetuneConfig, BenchConfig, MemoryConfig])
def test_every_field_has_help(config_type):
    docs = field_docs(config_type)
    assert set(docs) == {f.name for f in dataclasses.fields(config_type)}
    assert all(docs.values())


def test_the_optimizer_options_are_the_param_group_keys_in_every_config():
    optimizer_keys = {f.name for f in dataclasses.fields(ProjectionOptions)}
    optimizer_keys |= {f.name for f in dataclasses.fields(MomentOptions)}
    for config_type in (RunConfig, GradNormLoRPConfig):
        assert optimizer_keys <= {f.name for f in dataclasses.fields(config_type)}
    help_of = {cli: _flags(build()) for cli, build in PARSERS.items()}
    assert help_of["gnlorp-train"]["--proj-bits"] == help_of["gnlorp-memory"]["--proj-bits"]


def test_grad_reduction_takes_the_optimizers_names_and_the_old_ones_as_aliases():
    assert train_config(["--grad-reduction", "low_rank"]).grad_reduction == "low_rank"
    for old, new in (("ddp", "none"), ("owners", "full"), ("lowrank", "low_rank")):
        assert train_config(["--grad-reduction", old]).grad_reduction == new
    text = train_parser().format_help()
    assert "--grad-reduction {auto,none,full,low_rank}" in text
    assert "deprecated" in _flags(train_parser())["--grad-reduction"][0]
    with pytest.raises(SystemExit):
        train_config(["--grad-reduction", "allreduce"])


def test_a_yaml_file_gives_options_and_the_command_line_overrides_it(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("max_steps: 7\nrank: 4\ngrad-reduction: owners\nper_layer: true\n")
    config = train_config(["--config", str(run), "--rank", "8"])
    assert (config.max_steps, config.rank, config.grad_reduction, config.per_layer) == (
        7, 8, "full", True,
    )  # fmt: skip
    assert config == dataclasses.replace(
        RunConfig(), max_steps=7, rank=8, grad_reduction="full", per_layer=True
    )
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text("optimizer: adamw\nlr: 0.001\nbatch_size: 8\n")
    config = finetune_config(["--config", str(finetune), "--batch-size", "4"])
    assert (config.optimizer, config.lr, config.batch_size) == ("adamw", 0.001, 4)


def test_a_json_file_works_too_lists_included(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"methods": ["adamw", "galore"], "steps": 3, "sweep_values": 8}))
    config = bench_config(["--config", str(bench), "--steps", "5"])
    assert (config.methods, config.steps, config.sweep_values) == (("adamw", "galore"), 5, (8,))
    assert bench_config(["--config", str(bench), "--methods", "lora"]).methods == ("lora",)
    memory = tmp_path / "memory.json"
    memory.write_text(json.dumps({"model": "llama_nano", "tokens": 64, "dtype": "fp32"}))
    args = parse_namespace(memory_parser(), ["--config", str(memory), "--tokens", "32"])
    assert memory_config(args) == MemoryConfig(model="llama_nano", tokens=32, dtype="fp32")
    assert memory_main(["--config", str(memory), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] > 0


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("max_step: 7\n", "unknown option 'max_step'"),
        ("optimizer: sgd\n", "optimizer='sgd'; choose one of gradnormlorp, galore, adamw"),
        ("- 1\n- 2\n", "holds a list, not a mapping"),
    ],
)
def test_a_bad_config_file_is_a_usage_error_naming_the_key(tmp_path, capsys, content, named):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        train_config(["--config", str(path)])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_a_missing_or_unknown_config_file_is_refused(tmp_path, capsys):
    for path in (tmp_path / "absent.yaml", tmp_path / "run.toml"):
        if path.suffix == ".toml":
            path.write_text("max_steps = 1\n")
        with pytest.raises(SystemExit):
            bench_config(["--config", str(path)])
    err = capsys.readouterr().err
    assert "does not exist" in err and "use a .yaml, .yml or .json file" in err


def test_gradnormlorp_config_takes_every_projection_option_from_optim_args():
    args = SimpleNamespace(
        optim_args="rank=4,update_proj_gap=10,scale=0.5,proj_bits=8,svd_method=svd,"
        "lazy_refresh_threshold=0.9,bits=8",
        optim_target_modules=None,
        learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
    )  # fmt: skip
    config = GradNormLoRPConfig.from_training_args(args)
    assert (config.rank, config.proj_bits, config.lazy_refresh_threshold) == (4, 8, 0.9)
    model = nn.ModuleDict({"q_proj": nn.Linear(16, 16), "norm": nn.LayerNorm(16)})
    _, kwargs = gnlorp_optimizer_cls_and_kwargs(model, args, config)
    projected = next(g for g in kwargs["params"] if "rank" in g)
    assert projected["proj_bits"] == 8 and projected["svd_method"] == "svd"
    assert projected["lazy_refresh_threshold"] == 0.9 and kwargs["bits"] == 8
    # Left at their defaults, the extra options stay out of the group: GaLore's keys only.
    plain = gnlorp_optimizer_cls_and_kwargs(model, args, GradNormLoRPConfig())[1]["params"]
    assert set(next(g for g in plain if "rank" in g)) == {
        "params", "param_names", "rank", "update_proj_gap", "scale", "proj_type",
    }  # fmt: skip
    with pytest.raises(ValueError, match="svd_method='qr' is not one of"):
        GradNormLoRPConfig(svd_method="qr")
    assert torch.is_tensor(projected["params"][0])
