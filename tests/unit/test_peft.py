"""PEFT LoRA/DoRA models: projected_param_groups finds the adapters, GradNormLoRPAdamW trains
them like galore-torch does, and apply_weight_norm refuses PEFT models with the supported route."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from tests.tiny_llama import small_llama

peft = pytest.importorskip("peft")

LORA_R = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return small_llama(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def peft_llama(use_dora: bool, seed: int = 0, init_lora_weights: bool = True):
    config = peft.LoraConfig(
        r=LORA_R,
        lora_alpha=16,
        target_modules=TARGETS,
        lora_dropout=0.0,
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
    )
    # tiny_llama seeds the global generator, which PEFT's initialisation then draws from.
    return peft.get_peft_model(tiny_llama(seed), config)


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_default_groups_are_exactly_the_trainable_lora_factors(use_dora):
    model = peft_llama(use_dora)
    groups = projected_param_groups(model, rank=4, update_proj_gap=5, scale=1.0)
    projected = groups[0]
    factors = {n for n in _trainable(model) if ".lora_A." in n or ".lora_B." in n}
    assert len(factors) == 2 * len(TARGETS) * 2  # A and B, 7 layers per block, 2 blocks
    assert set(projected["param_names"]) == factors
    assert all(p.dim() == 2 and min(p.shape) == LORA_R for p in projected["params"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    listed = {n for g in groups for n in g["param_names"]}
    assert not listed & frozen, "a frozen base weight was put in a group"
    if use_dora:
        # DoRA's magnitude is 1-D: dense, like our WeightNormLinear magnitudes.
        dense = groups[1]["param_names"]
        assert len(dense) == 2 * len(TARGETS)
        assert all(".lora_magnitude_vector." in n for n in dense)
        assert listed == set(_trainable(model))
    else:
        assert len(groups) == 1 and listed == set(_trainable(model))


def test_every_trainable_adapter_is_projected_and_frozen_adapters_are_left_out():
    model = peft_llama(use_dora=False)
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    # PEFT trains the active adapter only; make both trainable, as multi-adapter training does.
    for name, param in model.named_parameters():
        if ".second." in name:
            param.requires_grad_(True)
    names = projected_param_groups(model, rank=2, update_proj_gap=5, scale=1.0)[0]["param_names"]
    assert sum(".second." in n for n in names) == 2 * 2  # q_proj A and B in both blocks
    assert sum(".default." in n for n in names) == 2 * len(TARGETS) * 2
    for name, param in model.named_parameters():
        if ".second." in name:
            param.requires_grad_(False)
    names = projected_param_groups(model, rank=2, update_proj_gap=5, scale=1.0)[0]["param_names"]
    assert not any(".second." in n for n in names)


def test_explicit_targets_on_a_peft_model_use_qualified_names_and_globs():
    model = peft_llama(use_dora=False)

    def names(*targets):
        groups = projected_param_groups(model, 4, 5, 1.0, target_modules=targets)
        return groups[0]["param_names"]

    lora_a = names("lora_A")
    assert len(lora_a) == 14 and all(n.endswith(".lora_A.default.weight") for n in lora_a)
    assert sorted(names("*.lora_B.*")) == sorted(n.replace("lora_A", "lora_B") for n in lora_a)
    # "q_proj" names the PEFT layer and everything inside it: its factors; base_layer is frozen.
    q = names("q_proj")
    assert len(q) == 4 and all(".q_proj.lora_" in n for n in q)
    assert names("layers.1.self_attn.q_proj") == [n for n in q if ".layers.1." in n]
    with pytest.raises(ValueError, match="frozen.*leave target_modules unset"):
        names("base_layer")


def test_projection_rank_must_stay_below_the_lora_rank():
    model = peft_llama(use_dora=False)
    with pytest.raises(ValueError, match=r"rank=8 is not below the LoRA rank.*\(8, 64\).*rank < 8"):
        projected_param_groups(model, rank=LORA_R, update_proj_gap=5, scale=1.0)
    with pytest.raises(ValueError, match=r"rank=16 is not below"):
        projected_param_groups(model, rank=16, update_proj_gap=5, scale=1.0)
    projected_param_groups(model, rank=LORA_R - 1, update_proj_gap=5, scale=1.0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_moves_the_adapters_lowers_the_loss_and_leaves_the_base_frozen(use_dora):
    model = peft_llama(use_dora, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = projected_param_groups(model, rank=4, update_proj_gap=5, scale=1.0)
    opt = GradNormLoRPAdamW(groups, lr=1e-2)
    ids = _batch(0)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if param.requires_grad:
            assert changed, f"{name} did not train"
        else:
            assert not changed, f"frozen {name} moved"


@pytest.mark.parametrize(
    ("use_dora", "init_lora_weights"),
    [(False, True), (False, False), (True, True)],
    ids=["lora", "lora-random-init", "dora"],
)
def test_matches_galore_torch_on_the_adapters(use_dora, init_lora_weights):
    """Weight norm off (a PEFT model has none of ours): every step equals GaLoreAdamW's.

    DoRA's magnitudes are frozen here: the dense group is torch AdamW's update in ours and
    HF-style AdamW (eps outside the bias correction) in galore-torch, 2% apart on such small
    gradients, and test_optimizer already pins our dense update to torch's."""
    galore_torch = pytest.importorskip("galore_torch")
    models = [peft_llama(use_dora, 7, init_lora_weights) for _ in range(2)]
    for model in models:
        for name, param in model.named_parameters():
            if ".lora_magnitude_vector." in name:
                param.requires_grad_(False)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
    optimizers = []
    for index, model in enumerate(models):
        groups = [
            {k: v for k, v in g.items() if k != "param_names"}
            for g in projected_param_groups(model, rank=4, update_proj_gap=3, scale=0.5)
        ]
        if index == 0:
            optimizers.append(GradNormLoRPAdamW(groups, lr=1e-2, weight_decay=0.01))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # galore-torch's own deprecation warnings
                optimizers.append(galore_torch.GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01))
    for step in range(8):
        for model, opt in zip(models, optimizers):
            opt.zero_grad()
            ids = _batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    with torch.no_grad():
        trained = [
            (p, q)
            for p, q in zip(models[0].parameters(), models[1].parameters())
            if p.requires_grad
        ]
        worst = max(float((p - q).norm() / q.norm().clamp_min(1e-12)) for p, q in trained)
        fresh = peft_llama(use_dora, 7, init_lora_weights)
        moved = max(
            float((p - q).norm())
            for p, q in zip(models[0].parameters(), fresh.parameters())
            if p.requires_grad
        )
    # fp32 SVDs of gradients that differ in the last bits at each refresh: ~1e-5 after 8 steps.
    assert worst < 3e-5, worst
    assert moved > 1e-3


def test_apply_weight_norm_refuses_peft_with_the_supported_routes():
    model = peft_llama(use_dora=False)
    route = (
        r"PEFT.*apply_weight_norm\(base_model, lora_rank=r\) on the plain model; for PEFT "
        r"LoRA/DoRA adapters use projected_param_groups\(peft_model\) with GradNormLoRPAdamW"
    )
    with pytest.raises(ValueError, match=route):
        apply_weight_norm(model)
    # The LlamaForCausalLM inside the PeftModel holds PEFT LoRA layers: refused just the same.
    with pytest.raises(ValueError, match=route):
        apply_weight_norm(model.base_model.model, lora_rank=4)
    assert not any(type(m).__name__ == "WeightNormLinear" for m in model.modules())
