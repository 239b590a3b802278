"""The optimizer and the weight-norm layer on a CUDA device: the CPU suite's references, again.

Skipped without a GPU (``tests/conftest.py``). TF32 is off in every test here: these are
equalities in fp32, and TF32 matmuls keep a 10-bit mantissa.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

from gnlorp_dist import (
    GradNormLoRPAdamW,
    PerLayerUpdates,
    apply_weight_norm,
    projected_param_groups,
)
from gnlorp_dist.nn import WeightNormLinear
from gnlorp_dist.optim.projection import compute_projection, projection_side, subspace_error

pytestmark = pytest.mark.gpu
GALORE_TOLERANCE = 1e-5
"""The CPU test holds 1e-6; on a GPU both optimizers run the same cuSOLVER SVD, but the update's
reductions may take other kernels than the CPU's, hence a decade of margin."""


@pytest.fixture
def cuda():
    """The current GPU with TF32 off, through ``fp32_precision``: torch >= 2.9 raises when that
    API and the legacy ``allow_tf32`` flags are mixed in one process."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.fp32_precision = "ieee"
    yield torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision = saved


def tiny_llama(device, seed=0, shape="states"):
    """``states``: matrices above the 4096-element floor of 8-bit states; ``galore``: the shape
    of the CPU suite's galore-torch check (tests/unit/test_groups.py), whose refreshes have no
    near-tied singular values at the rank (with ties, any 1e-7 difference may pick another
    subspace, on any device)."""
    sizes = {"states": (48, 96, 2), "galore": (32, 88, 4)}[shape]
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=sizes[0], intermediate_size=sizes[1], num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=sizes[2], max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(device)


def batch(step, device):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 128, (2, 16), generator=gen).to(device)


def relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_relative(a, b):
    with torch.no_grad():
        return max(relative(p, q) for p, q in zip(a.parameters(), b.parameters()))


def assert_states_on(optimizer, device):
    """Every state tensor lives with its parameter: none was created on the default CPU."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.device == device, (key, value.device)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_projected_step_equals_galore_torch_step_for_step(cuda, proj_type):
    galore_torch = pytest.importorskip("galore_torch")
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 24), (24, 40), (32, 32)]  # tall, wide, square
    init = [torch.randn(s, generator=gen).to(cuda) for s in shapes]
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    hyper = {"rank": 6, "update_proj_gap": 4, "scale": 0.25, "proj_type": proj_type}
    ours = GradNormLoRPAdamW([{"params": ours_params, **hyper}], lr=1e-2, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdamW([{"params": ref_params, **hyper}], lr=1e-2, weight_decay=0.1)
    for step in range(14):  # refreshes at 0, 4, 8, 12
        for p, q, (rows, cols) in zip(ours_params, ref_params, shapes):
            signal = torch.randn(rows, 3, generator=gen) @ torch.randn(3, cols, generator=gen)
            grad = (signal + 0.1 * torch.randn(rows, cols, generator=gen)).to(cuda)
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        for p, q in zip(ours_params, ref_params):
            error = relative(p.detach(), q.detach())
            assert error < GALORE_TOLERANCE, f"step {step}: {error:.2e} vs galore-torch"
    assert relative(ours_params[0].detach(), init[0]) > 1e-3  # the weights moved
    assert_states_on(ours, cuda)


def test_llama_trajectory_equals_galore_torch_on_real_gradients(cuda):
    galore_torch = pytest.importorskip("galore_torch")
    models = [tiny_llama(cuda, 7, "galore"), tiny_llama(cuda, 7, "galore")]
    optimizers = []
    for index, model in enumerate(models):
        projected, dense = projected_param_groups(model, rank=8, update_proj_gap=3, scale=0.25)
        for param in dense["params"]:  # the whole trajectory is the projected update
            param.requires_grad_(False)
        groups = [{k: v for k, v in projected.items() if k != "param_names"}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = GradNormLoRPAdamW if index == 0 else galore_torch.GaLoreAdamW
            optimizers.append(cls(groups, lr=1e-2, weight_decay=0.01))
    for step in range(8):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids.to(cuda), labels=ids.to(cuda)).loss.backward()
            optimizer.step()
    assert max_relative(models[0], models[1]) < GALORE_TOLERANCE
    assert max_relative(models[0], tiny_llama(cuda, 7, "galore")) > 1e-3


@pytest.mark.parametrize("detach_norm", [False, True])
def test_weight_norm_layer_gradients_equal_autograd_through_the_formula(cuda, detach_norm):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16, bias=True).to(device=cuda, dtype=torch.float64)
    layer = WeightNormLinear.from_linear(linear, detach_norm=detach_norm)
    x = torch.randn(7, 24, dtype=torch.float64, device=cuda)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-12, atol=1e-12)  # same at init
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    grad_out = torch.randn(7, 16, dtype=torch.float64, device=cuda)
    params = [layer.direction, layer.magnitude, layer.bias]
    grads = torch.autograd.grad((layer(x) * grad_out).sum(), params)
    norm = layer.direction.norm(dim=1, keepdim=True)
    norm = norm.detach() if detach_norm else norm
    weight = layer.magnitude[:, None] * layer.direction / norm  # W = m * V / ||V||_row
    ref = torch.autograd.grad((F.linear(x, weight, layer.bias) * grad_out).sum(), params)
    for name, g, r in zip(("direction", "magnitude", "bias"), grads, ref):
        assert g.device == cuda
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)
    merged = layer.to_linear()
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-12, atol=1e-12)


def _train(model, optimizer, steps, device):
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        ids = batch(step % 4, device)  # four batches, revisited: the loss must fall
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_8bit_states_track_fp32_by_loss(cuda):
    runs = {}
    for bits in (32, 8):
        model = apply_weight_norm(tiny_llama(cuda, seed=3))
        groups = projected_param_groups(model, rank=8, update_proj_gap=5, scale=0.25)
        optimizer = GradNormLoRPAdamW(groups, lr=1e-2, bits=bits)
        runs[bits] = (_train(model, optimizer, 20, cuda), optimizer)
    (fp32, _), (int8, opt8) = runs[32], runs[8]
    assert fp32[-1] < fp32[0] - 0.5 and int8[-1] < int8[0] - 0.5
    assert abs(int8[-1] - fp32[-1]) < 0.05 * fp32[-1], (int8[-1], fp32[-1])
    assert_states_on(opt8, cuda)
    codes = [v for s in opt8.state.values() for k, v in s.items() if k.startswith("exp_avg")]
    assert any(t.dtype == torch.uint8 for t in codes)  # 8-bit moments exist, on the GPU


def test_per_layer_mode_equals_the_normal_step(cuda):
    normal = apply_weight_norm(tiny_llama(cuda, seed=3))
    layered = copy.deepcopy(normal)
    optimizers = [
        GradNormLoRPAdamW(
            projected_param_groups(m, rank=6, update_proj_gap=3, scale=0.25),
            lr=1e-2,
            weight_decay=0.01,
        )
        for m in (normal, layered)
    ]
    with PerLayerUpdates(optimizers[1]):
        for step in range(7):  # refreshes at 0, 3, 6
            ids = batch(step, cuda)
            optimizers[0].zero_grad()
            normal(input_ids=ids, labels=ids).loss.backward()
            optimizers[0].step()
            layered(input_ids=ids, labels=ids).loss.backward()  # steps inside backward
            assert all(p.grad is None for p in layered.parameters())
    assert max_relative(layered, normal) < 1e-5
    assert max_relative(layered, apply_weight_norm(tiny_llama(cuda, seed=3))) > 1e-3
    assert_states_on(optimizers[1], cuda)


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_a_refresh_on_the_gpu_finds_the_cpus_subspace(cuda, method):
    """cuSOLVER and LAPACK may return singular vectors of opposite signs: bases on the two
    devices are compared by the distance of their spans, never entry by entry. Exact SVD keeps
    the library's own signs (GaLore's), so the entries themselves may differ."""
    gen = torch.Generator().manual_seed(5)
    decay = torch.logspace(0, -2, 24)
    grad = (torch.randn(96, 24, generator=gen) * decay) @ torch.randn(24, 160, generator=gen)
    side = projection_side(grad.shape, "std")
    bases = [
        compute_projection(
            grad.to(device), 8, side, method=method,
            generator=torch.Generator(device=device).manual_seed(0),
        ).cpu()
        for device in (torch.device("cpu"), cuda)
    ]  # fmt: skip
    assert subspace_error(bases[0], bases[1], side) < 1e-4
