"""gnlorp-train --project-lm-head: lm_head's gradient joins the projected group (issue #23)."""

import dataclasses
import json
import math

import pytest
import torch

from gnlorp_dist.optim import projected_param_groups
from gnlorp_dist.training.config import RunConfig, config_from_args, resolve
from gnlorp_dist.training.run import main, prepare, run_training
from gnlorp_dist.training.setup import build_optimizer, build_training_model, lm_head_targets
from tests.tiny_llama import TINY_JSON, tiny_args

pytestmark = pytest.mark.usefixtures("offline_shared_cache")


def _built(tiny_config, tmp_path, *extra):
    config, llama = resolve(config_from_args(tiny_args(tiny_config, tmp_path, *extra)))
    model = build_training_model(config, llama)
    return config, model, build_optimizer(config, model)


@pytest.mark.parametrize("optimizer", ["gradnormlorp", "galore"])
def test_off_by_default_the_groups_are_unchanged(tmp_path, tiny_config, optimizer):
    assert RunConfig().project_lm_head is False
    config, model, built = _built(tiny_config, tmp_path, "--optimizer", optimizer)
    # What build_optimizer gave before the flag existed: the default targets.
    before = projected_param_groups(model, config.rank, 1, 1.0)
    assert [g["param_names"] for g in built.param_groups] == [g["param_names"] for g in before]
    assert "lm_head.weight" in built.param_groups[1]["param_names"]


@pytest.mark.parametrize("optimizer", ["gradnormlorp", "galore"])
def test_the_flag_moves_exactly_lm_head_weight_into_the_projected_group(
    tmp_path, tiny_config, optimizer
):
    _, _, off = _built(tiny_config, tmp_path, "--optimizer", optimizer)
    _, model, on = _built(tiny_config, tmp_path, "--optimizer", optimizer, "--project-lm-head")
    projected_off, dense_off = (g["param_names"] for g in off.param_groups)
    projected_on, dense_on = (g["param_names"] for g in on.param_groups)
    assert projected_on == [*projected_off, "lm_head.weight"]  # the model's order: lm_head last
    assert dense_on == [n for n in dense_off if n != "lm_head.weight"]
    assert "model.embed_tokens.weight" in dense_on
    assert on.param_groups[0]["params"][-1] is model.lm_head.weight
    # GaLore-style: lm_head stays a plain linear (no weight norm), whatever the optimizer.
    assert type(model.lm_head) is torch.nn.Linear


def test_tied_embeddings_are_refused_naming_the_fix(tmp_path):
    tied = tmp_path / "tied.json"
    tied.write_text(json.dumps({**TINY_JSON, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match='"tie_word_embeddings": false'):
        resolve(config_from_args(tiny_args(str(tied), tmp_path, "--project-lm-head")))
    # A model tied some other way (after resolve) is refused when the groups are built.
    config, llama = resolve(config_from_args(tiny_args(str(tied), tmp_path)))
    model = build_training_model(config, llama)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    flagged = dataclasses.replace(config, project_lm_head=True)
    with pytest.raises(ValueError, match="tied word embeddings"):
        lm_head_targets(flagged, model)


def test_adamw_and_a_rank_above_lm_heads_side_are_refused(tmp_path, tiny_config):
    with pytest.raises(ValueError, match="--optimizer adamw projects nothing"):
        resolve(
            config_from_args(
                tiny_args(tiny_config, tmp_path, "--optimizer", "adamw", "--project-lm-head")
            )
        )
    hidden = TINY_JSON["hidden_size"]
    # lm_head (vocab x hidden) is never the binding side: q_proj (hidden x hidden) is named first.
    with pytest.raises(ValueError, match=rf"rank={hidden + 1} exceeds min\(shape\)={hidden}"):
        _built(tiny_config, tmp_path, "--optimizer", "galore", "--project-lm-head", "--rank",
               str(hidden + 1))  # fmt: skip


def test_a_short_run_trains_records_the_flag_and_refuses_a_resume_without_it(
    tmp_path, tiny_config, capsys
):
    run = prepare(config_from_args(tiny_args(tiny_config, tmp_path, "--project-lm-head")))
    result = run_training(run)
    assert result.final_step == 3 and all(math.isfinite(x) for x in result.losses)
    state = run.optimizer.state[run.model.lm_head.weight]
    vocab, rank = TINY_JSON["vocab_size"], run.config.rank
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (vocab, rank)  # not vocab x h
    checkpoint = tmp_path / "checkpoints" / "step-00000003"
    assert json.loads((checkpoint / "run_config.json").read_text())["project_lm_head"] is True
    with pytest.raises(SystemExit):
        main(tiny_args(tiny_config, tmp_path, "--max-steps", "4"))
    assert (
        "project_lm_head: checkpoint True, now False (pass --project-lm-head)"
        in capsys.readouterr().err
    )
