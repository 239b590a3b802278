"""``gnlorp-train --fsdp``: the flag, the refusals and the checkpoint-layout checks (no launch)."""

from __future__ import annotations

import json

import pytest
import torch

from gnlorp_dist.checkpoint.dcp import LAYOUT, check_layout_matches, is_dcp_checkpoint
from gnlorp_dist.distributed import fsdp2
from gnlorp_dist.training.config import config_from_args, resolve


def test_the_flag_parses_and_defaults_off():
    assert config_from_args([]).fsdp is False
    assert config_from_args(["--fsdp"]).fsdp is True


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--per-layer"], "--per-layer"),
        (["--grad-reduction", "full"], "--grad-reduction full"),
        (["--grad-reduction", "owners"], "--grad-reduction full"),  # the deprecated spelling
        (["--deepspeed", "ds_configs/zero2.json"], "--deepspeed ds_configs/zero2.json"),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_flags(flags, named):
    with pytest.raises(ValueError, match="--fsdp cannot be combined with") as err:
        resolve(config_from_args(["--fsdp", *flags]))
    assert named in str(err.value) and "drop --fsdp" in str(err.value)


def test_every_clash_is_named_at_once():
    with pytest.raises(ValueError) as err:
        resolve(config_from_args(["--fsdp", "--per-layer", "--grad-reduction", "low_rank"]))
    assert "--per-layer" in str(err.value) and "--grad-reduction low_rank" in str(err.value)


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--autocast", "bf16"],
        ["--optimizer", "adamw"],
        ["--bits", "8"],
        ["--grad-reduction", "none"],
        ["--grad-reduction", "ddp"],
    ],
)
def test_what_works_under_fsdp_resolves(flags):
    config, _ = resolve(config_from_args(["--fsdp", *flags]))
    assert config.fsdp


def _fake_checkpoint(folder, layout):
    folder.mkdir()
    state = {"format_version": 2, "step": 2, "data_state": {}, "extra": {}}
    if layout:
        state["layout"] = layout
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def test_a_dcp_checkpoint_needs_fsdp_and_the_reverse(tmp_path):
    dcp = _fake_checkpoint(tmp_path / "dcp", LAYOUT)
    plain = _fake_checkpoint(tmp_path / "plain", None)
    assert is_dcp_checkpoint(dcp) and not is_dcp_checkpoint(plain)
    check_layout_matches(dcp, fsdp=True)
    check_layout_matches(plain, fsdp=False)
    with pytest.raises(ValueError, match="written with --fsdp.*resume it with --fsdp"):
        check_layout_matches(dcp, fsdp=False)
    with pytest.raises(ValueError, match="written without --fsdp.*resume it without --fsdp"):
        check_layout_matches(plain, fsdp=True)


def test_decoder_layers_are_found_or_refused_clearly():
    from tests.tiny_llama import small_llama  # noqa: PLC0415

    torch.manual_seed(0)
    model = small_llama(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3)
    assert fsdp2.decoder_layers(model) == list(model.model.layers)
    with pytest.raises(ValueError, match="found no decoder layers in Sequential"):
        fsdp2.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fully_shard_model_without_a_process_group_names_the_fix(monkeypatch):
    monkeypatch.setattr(fsdp2.dist, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="needs torch.distributed's process group"):
        fsdp2.fully_shard_model(torch.nn.Linear(2, 2))
