"""--clip-norm-of: one rule at every world size, recorded resolved, kept by a resume.

The 1-process vs 2-process equivalence of the defaults and a 2-process checkpoint resumed on one
process run under real launchers in tests/distributed/test_launchers.py."""

from __future__ import annotations

import json

import pytest

from gnlorp_dist.training.clip_rule import clip_rule_before_it_was_recorded, resolve_clip_norm_of
from gnlorp_dist.training.config import RunConfig, config_record, resolve


def _config(tmp_path, **overrides):
    return RunConfig(**{"output_dir": str(tmp_path / "run"), **overrides})


def _checkpoint(tmp_path, world_size, **record):
    """A run folder whose newest checkpoint holds only what the rule is read from."""
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    saved = {"optimizer": "gradnormlorp", "grad_reduction": "auto", "grad_clip": 1.0, **record}
    (folder / "run_config.json").write_text(json.dumps(saved))
    state = {"format_version": 2, "step": 2, "world_size": world_size, "data_state": {}}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_auto_is_the_consumed_norm_at_every_world_size_for_the_projected_optimizers(
    tmp_path, world_size
):
    for optimizer in ("gradnormlorp", "galore"):
        config = _config(tmp_path, optimizer=optimizer)
        assert resolve_clip_norm_of(config, world_size).clip_norm_of == "consumed"
    # DDP-averaged gradients: the same rule (full stays available, see below).
    ddp = _config(tmp_path, grad_reduction="ddp")
    assert resolve_clip_norm_of(ddp, world_size).clip_norm_of == "consumed"
    # AdamW consumes the full gradient (the two norms coincide); DeepSpeed's engine clips it.
    adamw = _config(tmp_path, optimizer="adamw")
    assert resolve_clip_norm_of(adamw, world_size).clip_norm_of == "full"
    deepspeed = _config(tmp_path, deepspeed="ds_configs/zero2.json")
    assert resolve_clip_norm_of(deepspeed, world_size).clip_norm_of == "full"


def test_full_stays_available_where_a_rank_holds_the_full_gradient(tmp_path):
    full = _config(tmp_path, clip_norm_of="full")
    assert resolve_clip_norm_of(full, 1).clip_norm_of == "full"
    ddp = _config(tmp_path, clip_norm_of="full", grad_reduction="ddp")
    assert resolve_clip_norm_of(ddp, 2).clip_norm_of == "full"
    with pytest.raises(ValueError, match="--clip-norm-of full with --grad-reduction low_rank"):
        resolve_clip_norm_of(full, 2)


@pytest.mark.parametrize("optimizer", ["gradnormlorp", "adamw"])
def test_the_recorded_config_never_holds_auto(tmp_path, optimizer):
    config, llama = resolve(_config(tmp_path, optimizer=optimizer))
    for world_size in (1, 2):
        record = config_record(resolve_clip_norm_of(config, world_size), llama)
        assert record["clip_norm_of"] in ("full", "consumed")


def test_what_auto_meant_before_the_rule_was_recorded():
    legacy = {"optimizer": "gradnormlorp", "grad_reduction": "auto", "clip_norm_of": "auto"}
    assert clip_rule_before_it_was_recorded(legacy, 1) == "full"
    assert clip_rule_before_it_was_recorded(legacy, 2) == "consumed"
    assert clip_rule_before_it_was_recorded({**legacy, "grad_reduction": "ddp"}, 2) == "full"
    assert clip_rule_before_it_was_recorded({**legacy, "grad_reduction": "none"}, 2) == "full"
    assert clip_rule_before_it_was_recorded({**legacy, "grad_reduction": "owners"}, 2) == (
        "consumed"
    )
    assert clip_rule_before_it_was_recorded({**legacy, "fsdp": True}, 2) == "full"
    assert clip_rule_before_it_was_recorded({**legacy, "optimizer": "adamw"}, 2) == "full"
    # Before --clip-norm-of existed the loop clipped the full gradient.
    assert clip_rule_before_it_was_recorded({"optimizer": "galore"}, 2) == "full"
    assert clip_rule_before_it_was_recorded({**legacy, "clip_norm_of": "consumed"}, 1) == (
        "consumed"
    )


def test_a_resume_keeps_the_rule_its_checkpoint_used_and_logs_a_derived_one(tmp_path):
    _checkpoint(tmp_path, world_size=2, clip_norm_of="auto")
    logged = []
    kept = resolve_clip_norm_of(_config(tmp_path), 1, logged.append)
    assert kept.clip_norm_of == "consumed"
    assert len(logged) == 1 and "records --clip-norm-of auto, i.e. consumed on its 2" in logged[0]


def test_a_one_process_checkpoint_from_before_keeps_the_full_norm(tmp_path):
    _checkpoint(tmp_path, world_size=1, clip_norm_of="auto")
    logged = []
    assert resolve_clip_norm_of(_config(tmp_path), 1, logged.append).clip_norm_of == "full"
    assert "this run keeps clipping the full gradient norm" in logged[0]
    # On two processes only DDP-averaged gradients let a rank compute that norm.
    ddp = _config(tmp_path, grad_reduction="ddp")
    assert resolve_clip_norm_of(ddp, 2, logged.append).clip_norm_of == "full"
    with pytest.raises(ValueError, match=r"clipped the full gradient norm .*--grad-reduction none"):
        resolve_clip_norm_of(_config(tmp_path), 2, logged.append)


def test_a_resume_refuses_an_explicit_rule_other_than_its_checkpoints(tmp_path):
    checkpoint = _checkpoint(tmp_path, world_size=2, clip_norm_of="consumed")
    logged = []
    explicit = _config(tmp_path, clip_norm_of="consumed")
    assert resolve_clip_norm_of(explicit, 1, logged.append).clip_norm_of == "consumed"
    assert logged == []  # a recorded rule is kept silently
    with pytest.raises(ValueError) as refused:
        resolve_clip_norm_of(_config(tmp_path, clip_norm_of="full"), 1)
    message = str(refused.value)
    assert f"--clip-norm-of full, but checkpoint {checkpoint} clipped the consumed" in message
    assert "Pass --clip-norm-of consumed (or auto" in message and "--output-dir" in message
    # Nothing to keep when either run does not clip, or with --resume never.
    off = _config(tmp_path, clip_norm_of="full", grad_clip=0.0)
    assert resolve_clip_norm_of(off, 1).clip_norm_of == "full"
    fresh = _config(tmp_path, clip_norm_of="full", resume="never")
    assert resolve_clip_norm_of(fresh, 1).clip_norm_of == "full"
    # --resume PATH reads the checkpoint named.
    named = _config(tmp_path, clip_norm_of="full", resume=str(checkpoint), output_dir="other")
    with pytest.raises(ValueError, match="clipped the consumed"):
        resolve_clip_norm_of(named, 1)
