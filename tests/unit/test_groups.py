"""projected_param_groups on real (tiny) LLaMA models, and the optimizer on real gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gnlorp_dist import (
    GradNormLoRPAdamW,
    WeightNormLinear,
    apply_weight_norm,
    projected_param_groups,
)

PROJECTED_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))


def test_galore_groups_project_the_attention_and_mlp_weights_only():
    model = tiny_llama()
    projected, dense = projected_param_groups(model, rank=8, update_proj_gap=10, scale=0.25)
    assert len(projected["param_names"]) == 2 * 7
    assert all(
        n.endswith(tuple(f"{s}.weight" for s in PROJECTED_SUFFIXES))
        for n in projected["param_names"]
    )
    assert "lm_head.weight" in dense["param_names"]
    assert "model.embed_tokens.weight" in dense["param_names"]
    total = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(projected["params"]) + len(dense["params"]) == total
    assert projected["rank"] == 8 and projected["proj_type"] == "std"


def test_gradnormlorp_groups_project_directions_and_keep_magnitudes_dense():
    model = apply_weight_norm(tiny_llama())
    projected, dense = projected_param_groups(model, rank=8, update_proj_gap=10, scale=0.25)
    assert all(n.endswith(".direction") for n in projected["param_names"])
    assert len(projected["params"]) == 14
    magnitudes = [n for n in dense["param_names"] if n.endswith(".magnitude")]
    assert len(magnitudes) == 14


def test_lora_mode_projects_both_factors_and_skips_frozen_base():
    model = apply_weight_norm(tiny_llama(), lora_rank=4)
    for name, param in model.named_parameters():
        if not any(k in name for k in ("lora_", "magnitude")):
            param.requires_grad_(False)
    projected, dense = projected_param_groups(model, rank=2, update_proj_gap=10, scale=1.0)
    assert {n.rsplit(".", 1)[-1] for n in projected["param_names"]} == {"lora_A", "lora_B"}
    assert all(n.endswith(".magnitude") for n in dense["param_names"])
    assert not any("base_weight" in n for n in projected["param_names"] + dense["param_names"])


def test_unknown_targets_are_refused_with_the_layers_that_exist():
    with pytest.raises(ValueError, match="target_modules=\\('attn',\\).*model.layers.0"):
        projected_param_groups(
            tiny_llama(), rank=4, update_proj_gap=5, scale=1.0, target_modules=("attn",)
        )


def test_model_level_match_with_galore_torch_on_real_gradients():
    """Weight-norm off, dense params frozen: the whole trajectory is the projected update."""
    galore_torch = pytest.importorskip("galore_torch")
    models = [tiny_llama(seed=7), tiny_llama(seed=7)]
    optimizers = []
    for index, model in enumerate(models):
        projected, dense = projected_param_groups(model, rank=8, update_proj_gap=3, scale=0.25)
        for param in dense["params"]:
            param.requires_grad_(False)
        groups = [{k: v for k, v in projected.items() if k != "param_names"}]
        if index == 0:
            optimizers.append(GradNormLoRPAdamW(groups, lr=1e-2, weight_decay=0.01))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimizers.append(galore_torch.GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01))
    for step in range(8):
        for model, opt in zip(models, optimizers):
            opt.zero_grad()
            ids = _batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    with torch.no_grad():
        worst = max(
            float((p - q).norm() / q.norm())
            for p, q in zip(models[0].parameters(), models[1].parameters())
        )
        moved = max(
            float((p - q).norm() / q.norm())
            for p, q in zip(models[0].parameters(), tiny_llama(seed=7).parameters())
        )
    assert worst < 1e-5, worst
    assert moved > 1e-3


@pytest.mark.parametrize("use_weight_norm", [True, False])
def test_training_lowers_the_loss(use_weight_norm):
    model = tiny_llama(seed=1)
    if use_weight_norm:
        model = apply_weight_norm(model)
        assert any(isinstance(m, WeightNormLinear) for m in model.modules())
    opt = GradNormLoRPAdamW(
        projected_param_groups(model, rank=8, update_proj_gap=5, scale=0.25), lr=1e-2
    )
    ids = _batch(0)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


def _projected_names(model, targets):
    groups = projected_param_groups(model, 4, 5, 1.0, target_modules=targets)
    return groups[0]["param_names"]


def test_default_targets_are_todays_leaf_name_rule_on_a_plain_model():
    from gnlorp_dist.nn import DEFAULT_TARGET_MODULES

    model = tiny_llama()
    leaf_rule = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in DEFAULT_TARGET_MODULES
    ]
    default = projected_param_groups(model, rank=8, update_proj_gap=10, scale=0.25)
    assert default[0]["param_names"] == leaf_rule
    assert _projected_names(model, DEFAULT_TARGET_MODULES) == leaf_rule


def test_targets_match_qualified_names_components_and_globs_on_a_plain_model():
    model = tiny_llama()
    assert _projected_names(model, ("model.layers.0.self_attn.q_proj",)) == [
        "model.layers.0.self_attn.q_proj.weight"
    ]
    # A qualified suffix, and a dotted run in the middle of the name.
    assert _projected_names(model, ("0.self_attn.q_proj",)) == [
        "model.layers.0.self_attn.q_proj.weight"
    ]
    assert _projected_names(model, ("layers.*.q_proj",)) == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]
    # A component names every Linear inside it: the 4 attention projections of both blocks.
    attention = _projected_names(model, ("self_attn",))
    assert len(attention) == 8 and all(".self_attn." in n for n in attention)
    assert len(_projected_names(model, ("*_proj",))) == 14
    assert _projected_names(model, ("layers.1.mlp",)) == [
        f"model.layers.1.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    # A plain string is one target, not its characters; the head is projected only if named.
    assert _projected_names(model, "lm_head") == ["lm_head.weight"]
    for near_miss in ("attn", "q_pro", "layers.*.q"):
        with pytest.raises(ValueError, match="no parameter matched target_modules"):
            _projected_names(model, (near_miss,))
