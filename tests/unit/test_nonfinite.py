"""The non-finite policy: a NaN/inf gradient at ANY step is skipped (nothing changes) or raises.

One process and per-layer mode here; two ranks (DDP, owners, ZeRO) in
tests/distributed/test_nonfinite.py.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import load_file

from gnlorp_dist.optim import GradNormLoRPAdamW, PerLayerUpdates
from gnlorp_dist.optim.comm import non_finite_count
from gnlorp_dist.training.config import RunConfig, resolve
from gnlorp_dist.training.run import main
from tests.tiny_llama import tiny_args

STEPS = 7
BAD_STEP = 4  # not a refresh (update_proj_gap=3: refreshes at per-parameter steps 0, 3, 6)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (12, 20), (20,), (7, 5)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _optimizer(params, **kwargs) -> GradNormLoRPAdamW:
    a, b, c, d = params
    groups = [
        {
            "params": [a, b],
            "param_names": ["a", "b"],
            "rank": 4,
            "update_proj_gap": 3,
            "scale": 0.5,
            "proj_type": "std",
        },
        {"params": [c, d], "param_names": ["c", "d"]},
    ]
    return GradNormLoRPAdamW(groups, **{"lr": 1e-2, "weight_decay": 0.01, **kwargs})


def _grads(step: int, params) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _snapshot(params, opt) -> dict[str, object]:
    state = {
        (i, k): (v.clone() if torch.is_tensor(v) else v)
        for i, p in enumerate(params)
        for k, v in opt.state[p].items()
    }
    return {"weights": [p.detach().clone() for p in params], "state": state}


def _assert_same(before, after) -> None:
    assert all(torch.equal(x, y) for x, y in zip(before["weights"], after["weights"]))
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        other = after["state"][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def _run(poison: str | None, *, skip_bad: bool = False, policy: str = "skip"):
    """STEPS steps; at BAD_STEP the gradient of ``poison`` gets a NaN (None: clean run).
    ``skip_bad``: leave BAD_STEP out entirely (the reference for a skipped step)."""
    params = _params()
    opt = _optimizer(params, on_nonfinite=policy)
    index = {"a": 0, "b": 1, "c": 2, "d": 3}
    for step in range(STEPS):
        if skip_bad and step == BAD_STEP:
            continue
        grads = _grads(step, params)
        if step == BAD_STEP and poison is not None:
            grads[index[poison]].view(-1)[5] = math.nan
        for p, g in zip(params, grads):
            p.grad = g
        before = _snapshot(params, opt)
        opt.step()
        if step == BAD_STEP and poison is not None:
            assert opt.last_step_skipped
            _assert_same(before, _snapshot(params, opt))
        else:
            assert not opt.last_step_skipped
    return params, opt


@pytest.mark.parametrize("poison", ["a", "c"])  # a projected and a dense gradient
def test_skip_at_a_non_refresh_step_equals_the_run_without_that_step(poison):
    params, opt = _run(poison)
    ref_params, ref_opt = _run(None, skip_bad=True)
    assert opt.skipped_steps == 1 and ref_opt.skipped_steps == 0
    for p, r in zip(params, ref_params):
        assert torch.equal(p.detach(), r.detach())
        assert torch.isfinite(p).all()
    assert _snapshot(params, opt)["state"].keys() == _snapshot(ref_params, ref_opt)["state"].keys()
    _assert_same(_snapshot(params, opt), _snapshot(ref_params, ref_opt))


@pytest.mark.parametrize(("poison", "bad"), [("b", math.inf), ("d", -math.inf), ("c", math.nan)])
def test_raise_names_the_parameter_and_changes_nothing(poison, bad):
    params = _params()
    opt = _optimizer(params)  # the library default: raise
    assert opt.on_nonfinite == "raise"
    for step in range(BAD_STEP):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step()
    grads = _grads(BAD_STEP, params)
    grads["abcd".index(poison)].view(-1)[0] = bad
    for p, g in zip(params, grads):
        p.grad = g
    before = _snapshot(params, opt)
    with pytest.raises(ValueError, match=f"{poison}: non-finite gradient \\(step {BAD_STEP}\\)"):
        opt.step()
    _assert_same(before, _snapshot(params, opt))
    assert opt.skipped_steps == 0


def test_finite_runs_are_bitwise_unchanged_by_the_check():
    params, opt = _run(None)
    base_params = _params()
    base = _optimizer(base_params)
    for step in range(STEPS):
        for p, g in zip(base_params, _grads(step, base_params)):
            p.grad = g
        base.mark_gradients_finite()  # the baseline: no check at all (one process)
        base.step()
    for p, r in zip(params, base_params):
        assert torch.equal(p.detach(), r.detach())


def test_mark_gradients_finite_skips_the_check_once():
    params = _params()
    opt = _optimizer(params, on_nonfinite="skip")
    for p, g in zip(params, _grads(0, params)):
        p.grad = g
    opt.step()
    params[2].grad[0] = math.nan
    opt.step()
    assert opt.skipped_steps == 1
    params[2].grad[0] = 0.0
    opt.mark_gradients_finite()
    opt.step()
    assert not opt.last_step_skipped
    params[2].grad[0] = math.nan  # the promise held for one step only: checked again
    opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 2


def test_non_finite_count_is_one_fused_count():
    tensors = [torch.zeros(3, 4), torch.ones(5), torch.zeros(0), torch.ones(2, 2)]
    assert float(non_finite_count(tensors)) == 0
    tensors[1][2] = math.inf
    tensors[3][1, 1] = math.nan
    assert float(non_finite_count(tensors)) == 2
    assert float(non_finite_count([])) == 0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"lr": math.inf}, "lr=inf"),
        ({"lr": math.nan}, "lr=nan"),
        ({"eps": math.inf}, "eps=inf"),
        ({"weight_decay": math.nan}, "weight_decay=nan"),
        ({"betas": (0.9, math.nan)}, "betas=\\(0.9, nan\\)"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite='ignore'"),
    ],
)
def test_constructor_refuses_non_finite_hyperparameters(kwargs, named):
    with pytest.raises(ValueError, match=named):
        _optimizer(_params(), **kwargs)


def test_a_group_with_an_infinite_lr_is_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="param_groups\\[0\\]: lr=inf must be finite"):
        GradNormLoRPAdamW([{"params": [p], "lr": math.inf}])


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_per_layer_mode_raises_when_the_step_is_over_and_keeps_the_weights_finite(policy):
    # The verdict is read once per step (docs/gpu.md), after the backward pass that updated
    # every parameter: the error comes from that backward() whatever the policy, names every
    # offender, and the non-finite entries were taken as zero (tests/unit/test_host_syncs.py
    # checks that finite parameters took their normal step).
    params = _params()
    opt = _optimizer(params, on_nonfinite=policy)
    x = torch.randn(4, 16)

    def loss_of(scale):
        a, b, c, d = params
        h = (x @ a).sum() + b.square().sum() + c.sum() + d.square().sum()
        return h * scale

    updates = PerLayerUpdates(opt)
    try:
        for _ in range(BAD_STEP):
            loss_of(1.0).backward()
        with pytest.raises(ValueError, match="^a, b, c, d: non-finite gradient in per-layer"):
            loss_of(math.nan).backward()
        assert all(bool(torch.isfinite(p).all()) for p in params)
        loss_of(1.0).backward()  # the next step runs
    finally:
        updates.remove()


# -- gnlorp-train ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--grad-clip", "nan"], "--grad-clip must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--scale=-inf"], "--scale must be a finite number, got -inf"),
        (["--on-nonfinite", "ignore"], "invalid choice: 'ignore'"),
        (["--max-consecutive-skips", "0"], "--max-consecutive-skips must be positive"),
    ],
)
def test_cli_refuses_non_finite_flags(tmp_path, capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_resolve_refuses_nan_weight_decay():
    with pytest.raises(ValueError, match="--weight-decay must be a finite number, got nan"):
        resolve(RunConfig(weight_decay=math.nan))


def _poison_forward(monkeypatch, bad_calls: set[int]):
    """Multiply the loss by NaN on the given forward calls (counted from 1)."""
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)


@pytest.mark.usefixtures("offline_shared_cache")
@pytest.mark.parametrize("optimizer", ["gradnormlorp", "adamw"])
def test_cli_skips_a_nan_step_and_saves_finite_weights(
    tmp_path, tiny_config, capsys, monkeypatch, optimizer
):
    _poison_forward(monkeypatch, {2})
    argv = tiny_args(tiny_config, tmp_path, "--optimizer", optimizer, "--grad-clip", "0")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step 2 skipped: non-finite gradient (1 in a row, 1 in total)" in out
    checkpoint = tmp_path / "checkpoints" / "step-00000003"
    tensors = {}
    for path in checkpoint.rglob("*"):
        if path.suffix == ".safetensors":
            tensors.update(load_file(path))
        elif path.suffix in (".pt", ".bin"):
            loaded = torch.load(path, weights_only=True)
            stack = [loaded]
            while stack:
                item = stack.pop()
                if torch.is_tensor(item):
                    tensors[f"{path.name}:{len(tensors)}"] = item
                elif isinstance(item, dict):
                    stack.extend(item.values())
                elif isinstance(item, (list, tuple)):
                    stack.extend(item)
    assert tensors
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name


@pytest.mark.usefixtures("offline_shared_cache")
def test_cli_stops_after_too_many_skips_in_a_row(tmp_path, tiny_config, capsys, monkeypatch):
    _poison_forward(monkeypatch, {2, 3, 4})
    argv = tiny_args(tiny_config, tmp_path, "--max-steps", "6", "--max-consecutive-skips", "3")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "step 3 skipped: non-finite gradient (2 in a row, 2 in total)" in captured.out
    assert "step 4: 3 steps in a row skipped for a non-finite gradient" in captured.err
    assert "--lr" in captured.err and "--grad-clip" in captured.err


@pytest.mark.usefixtures("offline_shared_cache")
@pytest.mark.parametrize("optimizer", ["gradnormlorp", "adamw"])
def test_cli_raise_policy_stops_at_the_bad_step_with_one_line(
    tmp_path, tiny_config, monkeypatch, capsys, optimizer
):
    _poison_forward(monkeypatch, {2})
    argv = tiny_args(
        tiny_config, tmp_path, "--on-nonfinite", "raise", "--grad-clip", "0",
        "--optimizer", optimizer,
    )  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1, captured.err  # no traceback
    assert (
        "step 2: non-finite gradient in" in captured.err and "--on-nonfinite raise" in captured.err
    )
    logged = re.search(r"step 2: non-finite gradient in (\d+) parameters: (.*)", captured.out)
    names = logged[2].split(", ")
    assert int(logged[1]) == len(names) > 10 and "model.embed_tokens.weight" in names
    assert "step 2/" not in captured.out  # stopped before the step's line
