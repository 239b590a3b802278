"""What a resumed gnlorp-train run must share with its checkpoint (declared in the options tree),
what it may change with --override, and the counters it continues."""

import dataclasses
import json
import re

import pytest
from transformers import HfArgumentParser

from gnlorp_dist.integrations.transformers import GradNormLoRPConfig
from gnlorp_dist.options.fields import MUST_MATCH, OVERRIDABLE, resume_rule_fields
from gnlorp_dist.options.groups import (
    DataOptions,
    LoopOptions,
    MethodOptions,
    ModelOptions,
    ParallelOptions,
    PrecisionOptions,
    RuntimeOptions,
    ScheduleOptions,
)
from gnlorp_dist.options.optimizer import MomentOptions, ProjectionOptions
from gnlorp_dist.training.config import (
    RESUME_MUST_MATCH,
    RESUME_OVERRIDABLE,
    RunConfig,
    config_from_args,
    config_record,
    resolve,
)
from gnlorp_dist.training.resume_settings import resume_differences
from gnlorp_dist.training.run import main, prepare
from gnlorp_dist.training.schedule import warmup_cosine_factor
from gnlorp_dist.training.setup import build_optimizer, build_training_model
from tests.tiny_llama import tiny_args
from tests.unit.test_nonfinite import _poison_forward

pytestmark = pytest.mark.usefixtures("offline_shared_cache")

# ------------------------------------------------------------------------ the declared list


def test_the_compared_settings_are_the_ones_the_options_tree_declares():
    assert set(RESUME_MUST_MATCH) == {
        "model", "llama_config", "optimizer", "lora_rank", "detach_norm", "project_lm_head",
        # every projection and moment option (each one a param-group key of the saved state)
        "rank", "update_proj_gap", "scale", "proj_type", "proj_bits", "svd_method",
        "lazy_refresh_threshold", "granularity", "random_basis", "projection_seed", "bits",
        "second_moment",
        "dtype", "weight_decay", "seq_len", "data", "data_config", "text_field", "tokenizer",
        "eval_fraction", "seed",
    }  # fmt: skip
    assert RESUME_OVERRIDABLE == ("lr",)
    assert RESUME_MUST_MATCH[:-1] == resume_rule_fields(RunConfig, MUST_MATCH)


def test_every_projection_and_moment_option_is_compared():
    """Their field names are the optimizer's param-group keys, which a loaded state restores
    over the flag: a new option declared there without the rule fails here."""
    for group in (ProjectionOptions, MomentOptions):
        names = {f.name for f in dataclasses.fields(group)}
        assert set(resume_rule_fields(group, MUST_MATCH)) == names, group


OPTION_GROUPS = (ModelOptions, RuntimeOptions, PrecisionOptions, ScheduleOptions, DataOptions,
                 MethodOptions, LoopOptions, ParallelOptions, ProjectionOptions, MomentOptions)  # fmt: skip


@pytest.mark.parametrize("rule", [MUST_MATCH, OVERRIDABLE], ids=lambda rule: rule.name)
def test_run_config_keeps_the_rule_of_every_group_field_it_uses(rule):
    """RunConfig re-annotates the fields it shares (shared(...)): each keeps its group's rule."""
    ours = set(resume_rule_fields(RunConfig, rule))
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    for group in OPTION_GROUPS:
        assert set(resume_rule_fields(group, rule)) & run_fields <= ours, group


def test_stock_hf_argument_parser_still_reads_the_option_dataclasses():
    """The rules live in annotations: transformers' HfArgumentParser passes every field metadata
    key to add_argument, so a rule kept there would break users' own parsers."""
    for config_type in (RunConfig, GradNormLoRPConfig):
        HfArgumentParser(config_type)
    (parsed,) = HfArgumentParser(GradNormLoRPConfig).parse_args_into_dataclasses(["--rank", "8"])
    assert parsed.rank == 8


@pytest.mark.parametrize(
    "flags",
    [
        ["--granularity", "2", "--proj-bits", "8", "--lazy-refresh-threshold", "0.5",
         "--svd-method", "svd", "--second-moment", "factored", "--bits", "8",
         "--weight-decay", "0.1", "--project-lm-head"],
        ["--proj-type", "random", "--random-basis", "rademacher", "--projection-seed", "3"],
    ],
    ids=["svd-bases", "random-bases"],
)  # fmt: skip
def test_every_param_group_key_the_optimizer_saves_is_compared(tiny_config, tmp_path, flags):
    config, llama = resolve(config_from_args(tiny_args(tiny_config, tmp_path, *flags)))
    optimizer = build_optimizer(config, build_training_model(config, llama))
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    keys = {key for group in optimizer.param_groups for key in group} & fields
    assert keys >= {"rank", "lr", "bits"}  # the group keys were found at all
    assert keys <= set(RESUME_MUST_MATCH) | set(RESUME_OVERRIDABLE), keys


def _changed(value):
    if isinstance(value, bool):
        return not value
    if value is None:
        return 3
    if isinstance(value, int | float):
        return value * 2 + 1
    return f"{value}-other"


def test_each_declared_setting_is_refused_naming_the_flag_that_restores_it(tiny_config, tmp_path):
    saved = config_record(*resolve(config_from_args(tiny_args(tiny_config, tmp_path))))
    for name in resume_rule_fields(RunConfig, MUST_MATCH):
        old = saved.get(name, False)  # project_lm_head is recorded only when on
        refused, _ = resume_differences(
            saved, dict(saved, **{name: _changed(old)}), RunConfig, set()
        )
        assert len(refused) == 1 and refused[0].startswith(f"{name}: checkpoint {old!r}"), name
        flag = "--" + name.replace("_", "-")
        assert flag in refused[0], refused
    refused, _ = resume_differences(saved, dict(saved, lr=0.005), RunConfig, set())
    assert "--override lr=0.005" in refused[0]
    _, changed = resume_differences(saved, dict(saved, lr=0.005), RunConfig, {"lr"})
    assert changed == [f"lr: checkpoint {saved['lr']!r}, now 0.005"]
    # A checkpoint written before an option existed ran with its default.
    older = {k: v for k, v in saved.items() if k != "granularity"}
    assert resume_differences(older, saved, RunConfig, set()) == ([], [])
    refused, _ = resume_differences(older, dict(saved, granularity=2), RunConfig, set())
    assert refused == ["granularity: checkpoint 1, now 2 (pass --granularity 1)"]


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def granular_run(tmp_path_factory, tiny_config):
    """A 1-step run with --granularity 2 (its checkpoint at step 1)."""
    out = tmp_path_factory.mktemp("granular")
    assert main(tiny_args(tiny_config, out, "--granularity", "2", "--max-steps", "1")) == 0
    return out


@pytest.mark.parametrize("granularity", ["4", "1"])
def test_another_granularity_is_refused_not_ignored(granular_run, tiny_config, granularity):
    # Before: 2 -> 4 resumed bitwise as 2, and 2 -> 1 (or 1 -> 2) crashed in reshard.py.
    argv = tiny_args(tiny_config, granular_run, "--granularity", granularity, "--max-steps", "2")
    with pytest.raises(ValueError) as refused:
        prepare(config_from_args(argv))
    message = str(refused.value)
    assert f"granularity: checkpoint 2, now {granularity} (pass --granularity 2)" in message
    assert "incompatible" in message and "another --output-dir" in message


def test_a_resume_changes_lr_only_through_override(granular_run, tiny_config, tmp_path, capsys):
    saved = json.loads(
        (granular_run / "checkpoints" / "step-00000001" / "run_config.json").read_text()
    )
    old, new = saved["lr"], saved["lr"] / 4
    base = tiny_args(tiny_config, granular_run, "--granularity", "2", "--max-steps", "2")
    with pytest.raises(
        ValueError,
        match=rf"lr: checkpoint {old!r}, now {new!r} \(pass --lr {old}, or --override lr={new}",
    ):
        prepare(config_from_args([*base, "--lr", str(new)]))
    # Resumed into another folder (the fixture's stays as it is), with the override.
    second = tmp_path / "second"
    argv = [*tiny_args(tiny_config, second, "--granularity", "2", "--max-steps", "2"),
            "--resume", str(granular_run), "--override", f"lr={new}"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"--override: lr: checkpoint {old!r}, now {new!r}" in out
    logged = float(re.search(r"step +2/2 \| loss [\d.]+ \| lr ([\d.e+-]+)", out)[1])
    # The checkpoint's schedule position (step 1) with the new peak: warmup 0, 2 steps.
    assert logged == pytest.approx(new * warmup_cosine_factor(1, 0, 2, 0.1), rel=1e-3)
    record = json.loads((second / "checkpoints" / "step-00000002" / "run_config.json").read_text())
    assert record["lr"] == new and record["override"] == [f"lr={new}"]


def test_override_refuses_a_setting_that_shapes_the_state(tiny_config, tmp_path):
    for item, named in [("granularity=4", "shapes the optimizer state"),
                        ("max_steps=5", "--max-steps changes freely"), ("lr", "NAME=VALUE")]:  # fmt: skip
        with pytest.raises(ValueError, match=named):
            resolve(config_from_args(tiny_args(tiny_config, tmp_path, "--override", item)))
    with pytest.raises(ValueError, match="disagree"):
        resolve(config_from_args(["--lr", "0.01", "--override", "lr=0.005"]))


def test_the_skip_counter_continues_across_a_resume(tmp_path, tiny_config, capsys, monkeypatch):
    _poison_forward(monkeypatch, {2, 3, 4})  # training forwards, counted over both runs
    args = ["--max-consecutive-skips", "3", "--save-every", "1", "--grad-clip", "0"]
    assert main(tiny_args(tiny_config, tmp_path, *args, "--max-steps", "3")) == 0
    assert "step 3 skipped: non-finite gradient (2 in a row" in capsys.readouterr().out
    state = json.loads(
        (tmp_path / "checkpoints" / "step-00000003" / "trainer_state.json").read_text()
    )
    assert state["skips_in_a_row"] == 2
    with pytest.raises(SystemExit) as stopped:
        main(tiny_args(tiny_config, tmp_path, *args, "--max-steps", "5"))
    assert stopped.value.code == 1
    captured = capsys.readouterr()
    assert "had skipped its last 2 steps" in captured.out
    assert "step 4: 3 steps in a row skipped for a non-finite gradient" in captured.err
    assert "--override lr=VALUE" in captured.err
