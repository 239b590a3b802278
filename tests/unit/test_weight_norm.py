"""WeightNormLinear, its pure functions, and model surgery, against explicit references."""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from gnlorp_dist.nn import (
    DEFAULT_TARGET_MODULES,
    NORM_EPS,
    WeightNormLinear,
    apply_weight_norm,
    lora_direction,
    lora_row_norm,
    merge_weight_norm,
    row_norm,
    weight_norm_linear,
)
from gnlorp_dist.nn.weight_norm import _scale_for

OUT, IN, RANK = 12, 10, 3
MODES = [None, RANK]  # lora_rank: None = full mode
MODE_IDS = ["full", "lora"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def token_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def make_linear(bias: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias).to(dtype)


@torch.no_grad()
def perturb(layer: WeightNormLinear, seed: int = 3) -> None:
    """Move every trainable parameter away from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    for p in layer.parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.add_(0.3 * noise)


@torch.no_grad()
def perturb_model(model: nn.Module, seed: int = 3) -> None:
    for module in model.modules():
        if isinstance(module, WeightNormLinear):
            perturb(module, seed)
            seed += 1


def explicit_weight(layer: WeightNormLinear) -> torch.Tensor:
    """Reference W = diag(m) · V / ||V||_row built with plain autograd ops."""
    if layer.is_lora:
        v = layer.base_weight + layer.scaling * layer.lora_B @ layer.lora_A
    else:
        v = layer.direction
    norm = v.norm(dim=1, keepdim=True)
    if layer.detach_norm:
        norm = norm.detach()
    return layer.magnitude[:, None] * v / norm


# ---------------------------------------------------------------------------- init identity


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lora_rank", MODES, ids=MODE_IDS)
def test_output_identical_at_init(bias, lora_rank):
    linear = make_linear(bias)
    layer = WeightNormLinear.from_linear(linear, lora_rank=lora_rank)
    x = torch.randn(4, 5, IN)
    diff = (layer(x) - linear(x)).abs().max().item()
    assert diff < 1e-6, diff
    assert layer.in_features == IN and layer.out_features == OUT
    assert (layer.bias is not None) == bias


@pytest.mark.parametrize("lora_rank", MODES, ids=MODE_IDS)
def test_tiny_llama_logits_unchanged_by_apply(lora_rank):
    model = tiny_llama()
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
        apply_weight_norm(model, lora_rank=lora_rank)
        after = model(ids).logits
    n_wn = sum(isinstance(m, WeightNormLinear) for m in model.modules())
    assert n_wn == 2 * len(DEFAULT_TARGET_MODULES)
    assert isinstance(model.lm_head, nn.Linear)  # not targeted by default
    assert (after - before).abs().max().item() < 1e-5


def test_generate_unchanged_and_no_weight_attribute_needed():
    """transformers' Llama forward/generate never reads q_proj.weight etc.; no property needed."""
    model = tiny_llama()
    ids = token_ids()
    mask = torch.ones_like(ids)
    kwargs = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    before = model.generate(ids, **kwargs)
    apply_weight_norm(model)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "weight")
    assert torch.equal(model.generate(ids, **kwargs), before)


@pytest.fixture
def weight_reads(monkeypatch):
    """Every lookup of ``.weight`` on a WeightNormLinear, ``hasattr`` and ``getattr(m, "weight",
    None)`` included (a silent ``None`` would hide a reader), as ``file:line`` of the reader."""
    reads: list[str] = []

    def tripwire(self, name):
        if name == "weight":
            caller = sys._getframe(1)
            reads.append(f"{caller.f_code.co_filename}:{caller.f_lineno}")
        return nn.Module.__getattr__(self, name)

    monkeypatch.setattr(WeightNormLinear, "__getattr__", tripwire, raising=False)
    return reads


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_never_reads_the_weight_of_a_projection(weight_reads, tmp_path, attn):
    """What the layer's missing ``weight`` rests on, in the installed transformers (5.23 in the
    dev venv, the GPU image's 5.17 under ``make device-sim``): the attention implementations, the
    loss, backward with gradient checkpointing, generate, tying, re-initialisation, the model's
    dtype and size queries, and save_pretrained of the unmerged model all leave it alone."""
    model = tiny_llama()
    model.config._attn_implementation = attn
    apply_weight_norm(model, lora_rank=2)
    ids = token_ids()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.layers[0].mlp.down_proj.lora_A.grad is not None
    model.gradient_checkpointing_disable()
    model.eval()
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    model.tie_weights()
    model.init_weights()
    assert model.dtype == torch.float32 and model.num_parameters() > 0
    model.get_memory_footprint()
    model.save_pretrained(tmp_path)
    assert weight_reads == []


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("lora_rank", MODES, ids=MODE_IDS)
def test_gradients_match_explicit_formula(lora_rank, detach_norm, bias):
    layer = WeightNormLinear.from_linear(
        make_linear(bias, torch.float64), lora_rank=lora_rank, detach_norm=detach_norm
    )
    perturb(layer)
    x = torch.randn(7, IN, dtype=torch.float64)
    grad_out = torch.randn(7, OUT, dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]

    grads = torch.autograd.grad((layer(x) * grad_out).sum(), params)
    ref_out = F.linear(x, explicit_weight(layer), layer.bias)
    ref_grads = torch.autograd.grad((ref_out * grad_out).sum(), params)

    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert set(names) >= ({"lora_A", "lora_B", "magnitude"} if lora_rank else {"direction"})
    for name, g, ref in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12, msg=name)


def test_detach_norm_changes_direction_gradient():
    """Guards the test above against both settings giving the same gradient."""
    grads = []
    for detach in (False, True):
        layer = WeightNormLinear.from_linear(make_linear(False), detach_norm=detach)
        perturb(layer)
        layer(torch.ones(2, IN)).sum().backward()
        grads.append(layer.direction.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-3


def test_full_mode_direction_gradient_is_orthogonal_to_rows():
    """The true weight-norm gradient of V is orthogonal to each row of V (Salimans & Kingma)."""
    layer = WeightNormLinear.from_linear(make_linear(True, torch.float64))
    perturb(layer)
    layer(torch.randn(5, IN, dtype=torch.float64)).pow(2).sum().backward()
    row_dot = (layer.direction.grad * layer.direction).sum(dim=1)
    assert row_dot.abs().max() < 1e-12


# ---------------------------------------------------------------------------- LoRA norm


@pytest.mark.parametrize("b_scale", [1e-3, 0.1, 1.0, 3.0])
def test_lora_row_norm_expansion_matches_direct(b_scale):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 48, generator=gen, dtype=torch.float64) / 48**0.5
    a = torch.randn(8, 48, generator=gen, dtype=torch.float64) / 48**0.5
    b = b_scale * torch.randn(64, 8, generator=gen, dtype=torch.float64)
    scaling = 2.0
    for dtype, rtol in [(torch.float64, 1e-13), (torch.float32, 1e-6), (torch.bfloat16, 2e-3)]:
        w0_, a_, b_ = (t.to(dtype) for t in (w0, a, b))
        truth = row_norm(lora_direction(w0_.double(), a_.double(), b_.double(), scaling))
        got = lora_row_norm(w0_, a_, b_, scaling)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        rel = ((got.double() - truth) / truth).abs().max().item()
        assert rel < rtol, (dtype, rel)


def test_lora_row_norm_when_adapter_shrinks_rows_tenfold():
    """The expansion's documented weak spot: accuracy when ||W0 + sBA|| << ||W0||."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 32, generator=gen, dtype=torch.float64)
    b = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    w0 = -(b @ a) + 0.1 * (b @ a).norm(dim=1, keepdim=True) * F.normalize(
        torch.randn(16, 32, generator=gen, dtype=torch.float64), dim=1
    )
    truth = row_norm(lora_direction(w0, a, b, 1.0))
    assert (truth / row_norm(w0)).max() < 0.2  # the rows really shrink
    got = lora_row_norm(w0.float(), a.float(), b.float(), 1.0).double()
    assert ((got - truth) / truth).abs().max() < 1e-4


def test_lora_mode_layout():
    layer = WeightNormLinear.from_linear(make_linear(True), lora_rank=RANK)
    assert layer.lora_A.shape == (RANK, IN) and layer.lora_B.shape == (OUT, RANK)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.scaling == 1.0 and layer.lora_alpha == RANK  # alpha defaults to the rank
    assert not layer.base_weight.requires_grad
    assert "base_weight" in layer.state_dict()
    assert layer.projected_parameters() == [layer.lora_A, layer.lora_B]
    assert layer.projected_parameters()[0] is layer.lora_A
    layer.to(torch.float64)
    assert layer.base_weight.dtype == torch.float64 and not layer.base_weight.requires_grad
    torch.testing.assert_close(layer.magnitude, layer.base_weight.norm(dim=1))
    rep = repr(WeightNormLinear.from_linear(make_linear(False), lora_rank=2, lora_alpha=8))
    assert "lora_rank=2" in rep and "scaling=4" in rep and "bias=False" in rep


def test_full_mode_layout():
    layer = WeightNormLinear.from_linear(make_linear(True))
    assert [p is layer.direction for p in layer.projected_parameters()] == [True]
    assert layer.direction.shape == (OUT, IN) and layer.magnitude.shape == (OUT,)
    assert "mode=full" in repr(layer) and "detach_norm=False" in repr(layer)
    fresh = WeightNormLinear(IN, OUT, bias=False)
    torch.testing.assert_close(fresh.magnitude, fresh.direction.norm(dim=1))


# ---------------------------------------------------------------------------- merge


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lora_rank", MODES, ids=MODE_IDS)
def test_merge_is_exact(lora_rank, bias):
    layer = WeightNormLinear.from_linear(make_linear(bias), lora_rank=lora_rank)
    perturb(layer)
    x = torch.randn(6, IN)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear
    assert linear.weight.dtype == torch.float32 and (linear.bias is not None) == bias
    with torch.no_grad():
        torch.testing.assert_close(linear(x), layer(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.merged_weight(), explicit_weight(layer))
    assert not layer.merged_weight().requires_grad


def test_merge_weight_norm_on_tiny_llama():
    model = tiny_llama()
    apply_weight_norm(model, lora_rank=2)
    perturb_model(model)
    ids = token_ids()
    with torch.no_grad():
        trained = model(ids).logits
        merge_weight_norm(model)
        merged = model(ids).logits
    assert not any(isinstance(m, WeightNormLinear) for m in model.modules())
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
    assert (merged - tiny_llama()(ids).logits).abs().max() > 1e-2  # perturbation mattered


def test_merged_checkpoint_loads_in_stock_transformers(tmp_path):
    model = tiny_llama()
    stock_keys = set(model.state_dict())
    apply_weight_norm(model)
    perturb_model(model)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    merge_weight_norm(model).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == stock_keys
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- PEFT DoRA


def test_lora_mode_with_detached_norm_matches_peft_dora():
    peft = pytest.importorskip("peft")
    rank, alpha, targets = 4, 8, ["q_proj", "v_proj", "down_proj"]
    base = tiny_llama()
    ours = apply_weight_norm(
        copy.deepcopy(base), targets, lora_rank=rank, lora_alpha=alpha, detach_norm=True
    )
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, use_dora=True, target_modules=targets, lora_dropout=0.0
    )
    theirs = peft.get_peft_model(base, config)

    gen = torch.Generator().manual_seed(5)
    pairs = []
    for name, module in theirs.named_modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_A:
            with torch.no_grad():
                b = module.lora_B["default"].weight
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
                mag = module.lora_magnitude_vector["default"].weight
                mag.mul_(1 + 0.1 * torch.randn(mag.shape, generator=gen))
            mine = ours.get_submodule(name.removeprefix("base_model.model."))
            with torch.no_grad():
                mine.lora_A.copy_(module.lora_A["default"].weight)
                mine.lora_B.copy_(module.lora_B["default"].weight)
                mine.magnitude.copy_(module.lora_magnitude_vector["default"].weight)
            pairs.append((name, module, mine))
    assert len(pairs) == 2 * len(targets)

    ids = token_ids()
    theirs.train()
    ours.train()
    their_loss = theirs(ids, labels=ids).loss
    our_loss = ours(ids, labels=ids).loss
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-6)
    their_loss.backward()
    our_loss.backward()
    for name, module, mine in pairs:
        for theirs_p, mine_p in [
            (module.lora_A["default"].weight, mine.lora_A),
            (module.lora_B["default"].weight, mine.lora_B),
            (module.lora_magnitude_vector["default"].weight, mine.magnitude),
        ]:
            torch.testing.assert_close(mine_p.grad, theirs_p.grad, rtol=1e-4, atol=1e-6, msg=name)

    with torch.no_grad():
        theirs.eval()
        ours.eval()
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        their_merged = theirs.merge_and_unload()
        merge_weight_norm(ours)
        for name, _, _ in pairs:
            short = name.removeprefix("base_model.model.")
            torch.testing.assert_close(
                ours.get_submodule(short).weight,
                their_merged.get_submodule(short).weight,
                rtol=1e-5,
                atol=1e-6,
            )


# ---------------------------------------------------------------------------- dtypes, edges


@pytest.mark.parametrize("lora_rank", MODES, ids=MODE_IDS)
def test_bf16_forward_close_to_fp32(lora_rank):
    layer32 = WeightNormLinear.from_linear(make_linear(True), lora_rank=lora_rank)
    perturb(layer32)
    layer16 = copy.deepcopy(layer32).to(torch.bfloat16)
    x = torch.randn(8, IN)
    out32 = layer32(x)
    out16 = layer16(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    out16.float().sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in layer16.projected_parameters())
    rel = ((out16.float() - out32).norm() / out32.norm()).item()
    assert rel < 2e-2, rel


def test_tiny_llama_bf16_matches_stock_bf16():
    model = tiny_llama(dtype=torch.bfloat16)
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits.float()
        after = apply_weight_norm(model)(ids).logits.float()
    assert ((after - before).norm() / before.norm()).item() < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lora_rank", MODES, ids=MODE_IDS)
def test_zero_norm_rows_stay_finite(lora_rank, dtype):
    linear = make_linear(True)
    with torch.no_grad():
        linear.weight[2].zero_()
    layer = WeightNormLinear.from_linear(linear.to(dtype), lora_rank=lora_rank)
    with torch.no_grad():
        layer.magnitude[2] = 1.0  # worst case: m / eps would overflow fp16
    out = layer(torch.randn(3, IN, dtype=dtype))
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 2], layer.bias[2].expand(3).detach())
    assert torch.isfinite(layer.merged_weight()).all()
    if dtype != torch.float16:  # fp16 gradients of a zero row (about m / eps) overflow
        out.float().sum().backward()
        for p in layer.parameters():
            if p.requires_grad:
                assert torch.isfinite(p.grad).all()


def test_requires_grad_follows_source_in_full_mode():
    linear = make_linear(True)
    linear.weight.requires_grad_(False)
    layer = WeightNormLinear.from_linear(linear)
    assert not layer.direction.requires_grad and not layer.magnitude.requires_grad
    assert layer.bias.requires_grad
    assert not layer.to_linear().weight.requires_grad


# ---------------------------------------------------------------------------- bad input


def test_apply_rejects_unmatched_targets_listing_existing_names():
    with pytest.raises(ValueError, match=r"nope_proj.*q_proj"):
        apply_weight_norm(tiny_llama(), target_modules=["nope_proj"])


@pytest.mark.parametrize("rank", [0, -2, 17, 2.5])
def test_apply_rejects_bad_lora_rank(rank):
    model = tiny_llama()  # k_proj is (16, 32): the largest valid rank is 16
    with pytest.raises(ValueError, match=f"lora_rank={re.escape(str(rank))}"):
        apply_weight_norm(model, lora_rank=rank)
    assert not any(isinstance(m, WeightNormLinear) for m in model.modules())


def test_apply_accepts_largest_lora_rank():
    model = apply_weight_norm(tiny_llama(), lora_rank=16)
    assert model.model.layers[0].self_attn.k_proj.lora_rank == 16


def test_apply_rejects_non_linear_match():
    with pytest.raises(ValueError, match=r"input_layernorm.*LlamaRMSNorm"):
        apply_weight_norm(tiny_llama(), target_modules=["q_proj", "input_layernorm"])


def test_apply_twice_rejected():
    model = apply_weight_norm(tiny_llama())
    with pytest.raises(ValueError, match="already has WeightNormLinear"):
        apply_weight_norm(model)


def test_lora_alpha_checks():
    with pytest.raises(ValueError, match="lora_alpha=8 given without lora_rank"):
        apply_weight_norm(tiny_llama(), lora_alpha=8)
    with pytest.raises(ValueError, match=r"lora_alpha=-1\.0"):
        apply_weight_norm(tiny_llama(), lora_rank=2, lora_alpha=-1.0)
    with pytest.raises(ValueError, match="lora_rank=11"):
        WeightNormLinear.from_linear(make_linear(True), lora_rank=11)


def test_targets_other_modules_and_single_string():
    model = tiny_llama()
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
        apply_weight_norm(model, target_modules="lm_head")
        after = model(ids).logits
    assert isinstance(model.lm_head, WeightNormLinear)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora_rank", MODES, ids=MODE_IDS)
def test_autograd_saves_no_weight_sized_copy(lora_rank, dtype):
    """The forward keeps no (out, in) tensor for backward besides the parameter itself."""
    layer = WeightNormLinear.from_linear(make_linear(True, dtype), lora_rank=lora_rank)
    weight = layer.base_weight if lora_rank else layer.direction
    copies = []

    def pack(t):
        if t.numel() >= weight.numel() and t.data_ptr() != weight.data_ptr():
            copies.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(2, IN, dtype=dtype))
    assert copies == []


def test_zero3_partitioned_weights_are_refused_with_the_order_to_use():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(8, 8))
    model.q_proj.weight.ds_shape = (8, 8)  # what deepspeed.zero.Init leaves on a weight
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3.*call apply_weight_norm"):
        apply_weight_norm(model, target_modules=("q_proj",))


# -- the scaled product: gradients and saved bytes against the plain composition --------------


def plain_weight_norm_linear(x, direction, magnitude, bias, *, detach_norm, eps=NORM_EPS):
    """The composition ``weight_norm_linear`` replaced: autograd saves ``x Vᵀ`` for the scale."""
    out = F.linear(x, direction)
    out = out * _scale_for(magnitude, row_norm(direction, eps), out.dtype, detach_norm)
    return out if bias is None else out + bias


def wn_leaves(dtype, *, case: str, seed: int = 5):
    """x, V, m, b (float64 values rounded to ``dtype``) for a gradient comparison."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    direction, magnitude, bias = draw(OUT, IN), draw(OUT).abs() + 0.5, draw(OUT)
    if case == "zero_rows":
        direction[0] = 0  # clamped norm: a huge but finite scale
        magnitude[1] = 0  # a zero scale on a nonzero row
    direction.requires_grad_(case != "frozen_direction")
    return direction, magnitude.requires_grad_(), bias.requires_grad_()


def noncontiguous(shape, dtype, seed):
    """A random tensor of ``shape`` whose memory is laid out transposed."""
    gen = torch.Generator().manual_seed(seed)
    flipped = torch.randn(*reversed(shape), generator=gen, dtype=torch.float64).to(dtype)
    return flipped.permute(*reversed(range(len(shape))))


@pytest.mark.parametrize("case", ["plain", "frozen_direction", "zero_rows"])
@pytest.mark.parametrize("x_shape", [(7, IN), (2, 5, IN)], ids=["2d", "3d"])
@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scaled_product_gradients_match_plain_composition(dtype, detach_norm, x_shape, case):
    direction, magnitude, bias = wn_leaves(dtype, case=case)
    x = noncontiguous(x_shape, dtype, seed=6).requires_grad_()
    grad_out = noncontiguous((*x_shape[:-1], OUT), dtype, seed=7)
    assert not grad_out.is_contiguous()
    leaves = [t for t in (x, direction, magnitude, bias) if t.requires_grad]

    out = weight_norm_linear(x, direction, magnitude, bias, detach_norm=detach_norm)
    ref = plain_weight_norm_linear(x, direction, magnitude, bias, detach_norm=detach_norm)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)

    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        # Relative to the tensor's largest entry: zero rows make some entries ~1e12.
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())


def test_scaled_product_skips_unneeded_gradients():
    """A frozen layer on an input that needs no gradient keeps nothing for backward."""
    direction, magnitude, bias = wn_leaves(torch.float32, case="plain")
    x = torch.randn(4, IN)
    direction.requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = weight_norm_linear(x, direction, magnitude.detach(), bias)
    assert saved == [] and out.requires_grad
    # Only the magnitude trainable: m's gradient still flows (through G · V), x is not needed.
    out = weight_norm_linear(x, direction, magnitude, None)
    (grad_m,) = torch.autograd.grad(out.sum(), [magnitude])
    ref = plain_weight_norm_linear(x, direction, magnitude, None, detach_norm=False)
    torch.testing.assert_close(grad_m, torch.autograd.grad(ref.sum(), [magnitude])[0])


def saved_activation_bytes(fn, params) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of the distinct non-parameter storages autograd saves while ``fn()`` runs."""
    excluded = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}
    shapes = []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded and ptr not in storages:
            storages[ptr] = t.untyped_storage().nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values()), shapes


@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("x_shape", [(7, IN), (2, 5, IN)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_product_saves_no_tokens_by_out_tensor(dtype, x_shape, detach_norm):
    direction, magnitude, bias = wn_leaves(dtype, case="plain")
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    params = (direction, magnitude, bias)
    kwargs = {"detach_norm": detach_norm}
    new, new_shapes = saved_activation_bytes(
        lambda: weight_norm_linear(x, *params, **kwargs), params
    )
    old, _ = saved_activation_bytes(lambda: plain_weight_norm_linear(x, *params, **kwargs), params)

    tokens = x.numel() // IN
    assert x_shape in new_shapes
    # Besides x, only per-output vectors: norms, the scale, float32 copies of them.
    vectors = [shape for shape in new_shapes if shape != x_shape]
    assert all(shape in ((OUT,), ()) for shape in vectors), new_shapes
    assert new - x.untyped_storage().nbytes() <= len(vectors) * OUT * 8
    # The plain composition saved the same plus the product x Vᵀ (tokens x out).
    assert old == new + tokens * OUT * x.element_size()


def test_scaled_product_under_autocast_matches_plain_composition():
    direction, magnitude, bias = wn_leaves(torch.float32, case="plain")
    x = torch.randn(2, 5, IN, requires_grad=True)
    leaves = [x, direction, magnitude, bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = weight_norm_linear(x, direction, magnitude, bias)
        ref = plain_weight_norm_linear(x, direction, magnitude, bias, detach_norm=False)
    assert out.dtype == ref.dtype  # the bf16 product plus the float32 bias
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)
    for g, r in zip(
        torch.autograd.grad(out.float().sum(), leaves),
        torch.autograd.grad(ref.float().sum(), leaves),
        strict=True,
    ):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=3e-2, atol=3e-2 * r.abs().max().item())
