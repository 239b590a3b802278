"""GradNormLoRPAdamW against its references: galore-torch (projected) and torch AdamW (dense)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from gnlorp_dist.optim import GradNormLoRPAdamW

SHAPES = {"tall": (40, 24), "wide": (24, 40), "square": (32, 32)}


def _grads(shapes: list[tuple[int, int]], steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    # A slowly rotating low-rank signal plus noise, so the subspace matters and changes.
    out = []
    for step in range(steps):
        row = []
        for rows, cols in shapes:
            signal = torch.randn(rows, 3, generator=gen) @ torch.randn(3, cols, generator=gen)
            row.append(signal + 0.1 * (1 + step % 3) * torch.randn(rows, cols, generator=gen))
        out.append(row)
    return out


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _galore_adamw():
    galore_torch = pytest.importorskip("galore_torch")
    return galore_torch.GaLoreAdamW


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_projected_groups_match_galore_torch_step_for_step(proj_type, weight_decay):
    GaLoreAdamW = _galore_adamw()
    shapes = list(SHAPES.values())
    torch.manual_seed(0)
    init = [torch.randn(s) for s in shapes]
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    hyper = {"rank": 6, "update_proj_gap": 4, "scale": 0.25, "proj_type": proj_type}
    ours = GradNormLoRPAdamW([{"params": ours_params, **hyper}], lr=1e-2, weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = GaLoreAdamW([{"params": ref_params, **hyper}], lr=1e-2, weight_decay=weight_decay)

    for step, grads in enumerate(_grads(shapes, steps=14)):  # refreshes at 0, 4, 8, 12
        for p, q, g in zip(ours_params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ours_params, ref_params):
            err = _relative_error(p.detach(), q.detach())
            assert err < 1e-6, f"step {step}: relative error {err:.2e} vs galore-torch"
    for p, q in zip(ours_params, ref_params):
        assert ours.state[p]["step"] == ref.state[q]["step"] == 14
        torch.testing.assert_close(ours.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        torch.testing.assert_close(ours.state[p]["proj"], ref.state[q]["projector"].ortho_matrix)


def test_the_weights_actually_move_and_differ_from_dense_adam():
    # Guards the reference test above against comparing two no-ops.
    shape = SHAPES["tall"]
    p = torch.nn.Parameter(torch.randn(shape))
    d = torch.nn.Parameter(p.detach().clone())
    start = p.detach().clone()
    hyper = {"rank": 4, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std"}
    proj_opt = GradNormLoRPAdamW([{"params": [p], **hyper}], lr=1e-2)
    dense_opt = GradNormLoRPAdamW([d], lr=1e-2)
    for (g,) in _grads([shape], steps=3):
        p.grad, d.grad = g.clone(), g.clone()
        proj_opt.step()
        dense_opt.step()
    assert _relative_error(p.detach(), start) > 1e-3
    assert _relative_error(p.detach(), d.detach()) > 1e-3
    assert proj_opt.state[p]["exp_avg"].shape == (shape[0], 4)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_dense_groups_match_torch_adamw(weight_decay):
    torch.manual_seed(1)
    shapes = [(16, 8), (8,), (3, 4, 5)]
    init = [torch.randn(s) for s in shapes]
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    kwargs = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": weight_decay}
    ours = GradNormLoRPAdamW(ours_params, **kwargs)
    ref = torch.optim.AdamW(ref_params, **kwargs)
    gen = torch.Generator().manual_seed(2)
    for step in range(12):
        for p, q in zip(ours_params, ref_params):
            g = torch.randn(p.shape, generator=gen) * (1 + step)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ours_params, ref_params):
            assert _relative_error(p.detach(), q.detach()) < 1e-6


def _run(params, opt, grads):
    for row in grads:
        for p, g in zip(params, row):
            p.grad = g.clone()
        opt.step()


def test_state_dict_resumes_the_same_trajectory_bitwise():
    shapes = [SHAPES["tall"], SHAPES["wide"], (24,)]
    grads = [[g[0], g[1], g[0][0].clone()] for g in _grads(shapes[:2], steps=13, seed=5)]
    torch.manual_seed(3)
    init = [torch.randn(s) for s in shapes]

    def make(params):
        return GradNormLoRPAdamW(
            [
                {
                    "params": params[:2],
                    "rank": 5,
                    "update_proj_gap": 4,
                    "scale": 0.5,
                    "proj_type": "std",
                },
                {"params": params[2:]},
            ],
            lr=1e-2,
            weight_decay=0.01,
        )

    straight = [torch.nn.Parameter(t.clone()) for t in init]
    _run(straight, make(straight), grads)

    first = [torch.nn.Parameter(t.clone()) for t in init]
    opt = make(first)
    _run(first, opt, grads[:6])
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "params": [p.detach() for p in first]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["optimizer"])
    _run(resumed, opt2, grads[6:])  # crosses the refreshes at steps 8 and 12
    for p, q in zip(resumed, straight):
        assert torch.equal(p.detach(), q.detach())


def test_bf16_parameters_step_with_float32_svd():
    p = torch.nn.Parameter(torch.randn(32, 16).to(torch.bfloat16))
    opt = GradNormLoRPAdamW(
        [{"params": [p], "rank": 4, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std"}]
    )
    before = p.detach().clone()
    for (g,) in _grads([(32, 16)], steps=3):
        p.grad = g.to(torch.bfloat16)
        opt.step()
    assert opt.state[p]["proj"].dtype == torch.bfloat16
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    assert not torch.equal(p.detach(), before)
    assert torch.isfinite(p.detach()).all()


def _group(param, **overrides):
    group = {"params": [param], "rank": 4, "update_proj_gap": 10, "scale": 1.0, "proj_type": "std"}
    group.update(overrides)
    return group


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": -3}, "rank=-3"),
        ({"rank": 17}, "rank=17 exceeds min\\(shape\\)=16"),
        ({"update_proj_gap": 0}, "update_proj_gap=0"),
        ({"update_proj_gap": 2.5}, "update_proj_gap=2.5"),
        ({"proj_type": "diagonal"}, "proj_type='diagonal'"),
        ({"scale": float("nan")}, "scale=nan"),
        ({"svd_method": "magic"}, "svd_method='magic'"),
    ],
)
def test_bad_projected_groups_are_refused_at_construction(overrides, match):
    p = torch.nn.Parameter(torch.randn(16, 32))
    with pytest.raises(ValueError, match=match):
        GradNormLoRPAdamW([_group(p, **overrides)])


def test_missing_group_keys_are_named():
    p = torch.nn.Parameter(torch.randn(16, 32))
    with pytest.raises(ValueError, match="lacks \\['update_proj_gap', 'scale', 'proj_type'\\]"):
        GradNormLoRPAdamW([{"params": [p], "rank": 4}])


def test_one_d_parameters_are_refused_and_zero3_partitions_judged_by_true_shape():
    bias = torch.nn.Parameter(torch.randn(32))
    with pytest.raises(ValueError, match="model.bias: shape \\(32,\\) cannot be projected"):
        GradNormLoRPAdamW([{**_group(bias), "param_names": ["model.bias"]}])
    flat = torch.nn.Parameter(torch.randn(0))
    flat.ds_shape = (16, 32)  # what a ZeRO-3 partitioned parameter looks like
    GradNormLoRPAdamW([_group(flat)])  # accepted: a 16 x 32 matrix, projected at the first step
    with pytest.raises(ValueError, match="rank=20 exceeds min\\(shape\\)=16 of shape \\(16, 32\\)"):
        GradNormLoRPAdamW([_group(flat, rank=20)])
    flat.ds_shape = (512,)
    with pytest.raises(ValueError, match="shape \\(512,\\) cannot be projected"):
        GradNormLoRPAdamW([_group(flat)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_at_refresh_raises_and_touches_nothing(bad):
    a = torch.nn.Parameter(torch.randn(16, 8))
    b = torch.nn.Parameter(torch.randn(16, 8))
    opt = GradNormLoRPAdamW(
        [{**_group(a, update_proj_gap=2), "params": [a, b], "param_names": ["a", "b"]}], lr=1e-2
    )
    for ga, gb in _grads([(16, 8), (16, 8)], steps=2):
        a.grad, b.grad = ga, gb
        opt.step()
    saved = {k: v.clone() for k, v in opt.state[b].items() if torch.is_tensor(v)}
    before_a, before_b = a.detach().clone(), b.detach().clone()
    a.grad = torch.randn(16, 8)
    b.grad = torch.randn(16, 8)
    b.grad[3, 2] = bad
    with pytest.raises(
        ValueError, match="b: non-finite gradient at a subspace refresh \\(step 2\\)"
    ):
        opt.step()
    assert torch.equal(a.detach(), before_a) and torch.equal(b.detach(), before_b)
    for key, value in saved.items():
        assert torch.equal(opt.state[b][key], value)
    assert opt.state[a]["step"] == opt.state[b]["step"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr=-1.0"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradNormLoRPAdamW([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_closure_is_evaluated_with_grad_enabled():
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = GradNormLoRPAdamW([_group(p, rank=2)])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == pytest.approx(16.0)
    assert opt.state[p]["step"] == 1
