"""Every tensor the optimizer allocates follows its parameters' device (one process).

The library's calls run with the default device set to ``meta`` while the parameters, gradients
and states live on the CPU: a tensor built without an explicit device lands on ``meta`` and fails
at once (``.item()`` on meta, or a device mismatch), exactly where a CUDA run would mix host and
GPU tensors. Each scenario is also run without the meta default and must give bitwise the same
weights and states, so a test cannot pass by skipping work. The multi-rank counterparts (gloo,
and a communicator that refuses foreign devices like NCCL) are in
``tests/distributed/test_device_rule.py``.
"""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from torch import nn

from gnlorp_dist import GradNormLoRPAdamW, PerLayerUpdates, apply_weight_norm
from gnlorp_dist.optim.comm import LocalCommunicator
from gnlorp_dist.optim.fragments import Fragment
from gnlorp_dist.optim.functional import clip_by_norm_
from gnlorp_dist.optim.groups import projected_param_groups
from gnlorp_dist.optim.layouts import engine_layouts, use_engine_layouts

SHAPES = [(256, 48), (48, 256), (64, 64)]
"""Projected matrices: with rank 16 the first two have 4096-element low-rank moments (8-bit)."""
DENSE_SHAPES = [(64, 64), (64,)]
"""A dense matrix big enough for 8-bit moments, and a vector that stays float32."""
RANK, GAP, STEPS = 16, 2, 3  # refreshes at steps 0 and 2, a plain step in between


def default_device(meta: bool) -> contextlib.AbstractContextManager:
    return torch.device("meta") if meta else contextlib.nullcontext()


def make_params(seed: int = 0) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    projected = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    dense = [nn.Parameter(torch.randn(s, generator=gen)) for s in DENSE_SHAPES]
    return projected, dense


def set_grads(params: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)


def groups(projected, dense, proj_type="std", svd_method="svd"):
    return [
        {
            "params": projected,
            "rank": RANK,
            "update_proj_gap": GAP,
            "scale": 0.25,
            "proj_type": proj_type,
            "svd_method": svd_method,
        },
        {"params": dense},
    ]


def state_tensors(optimizer) -> list[torch.Tensor]:
    return [
        value
        for key in sorted(optimizer.state, key=str)
        if isinstance(key, str)
        for value in optimizer.state[key].values()
        if torch.is_tensor(value)
    ] + [
        value
        for group in optimizer.param_groups
        for param in group["params"]
        for value in optimizer.state.get(param, {}).values()
        if torch.is_tensor(value)
    ]


def assert_same_and_on_cpu(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        assert a.device.type == "cpu", a.device
        assert a.dtype == b.dtype and torch.equal(a, b)


def run_steps(meta: bool, bits: int, proj_type: str, svd_method: str):
    projected, dense = make_params()
    optimizer = GradNormLoRPAdamW(
        groups(projected, dense, proj_type, svd_method), lr=1e-2, weight_decay=0.01, bits=bits
    )
    for step in range(STEPS):
        set_grads(projected + dense, step)
        with default_device(meta):
            optimizer.step()
    return [p.detach().clone() for p in projected + dense], optimizer


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("proj_type", ["std", "left", "right"])
@pytest.mark.parametrize("svd_method", ["svd", "randomized"])
def test_step_allocates_on_the_parameters_device(bits, proj_type, svd_method):
    weights, optimizer = run_steps(True, bits, proj_type, svd_method)
    expected_weights, expected_optimizer = run_steps(False, bits, proj_type, svd_method)
    assert_same_and_on_cpu(weights, expected_weights)
    assert_same_and_on_cpu(state_tensors(optimizer), state_tensors(expected_optimizer))
    assert not torch.equal(weights[0], make_params()[0][0])  # the steps moved the weights
    if bits == 8:
        assert any(t.dtype == torch.uint8 for t in state_tensors(optimizer))


class TinyMLP(nn.Module):
    """Linear layers named like LLaMA's, so apply_weight_norm and the groups find them."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(64, 64)
        self.up_proj = nn.Linear(64, 128)
        self.down_proj = nn.Linear(128, 64)
        self.head = nn.Linear(64, 64)  # not targeted: a dense 4096-element weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down_proj(torch.relu(self.up_proj(self.q_proj(x)))))


def inputs(step: int, micro: int = 0) -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(10 * step + micro))


def weight_norm_model() -> nn.Module:
    return apply_weight_norm(TinyMLP(seed=4), target_modules=("q_proj", "up_proj", "down_proj"))


def weight_norm_optimizer(model: nn.Module, bits: int, **kwargs) -> GradNormLoRPAdamW:
    groups = projected_param_groups(
        model, rank=32, update_proj_gap=GAP, scale=0.25, target_modules=("q_proj",)
    )
    return GradNormLoRPAdamW(groups, lr=1e-2, weight_decay=0.01, bits=bits, **kwargs)


def flat(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def run_weight_norm(meta: bool, bits: int) -> tuple[list[torch.Tensor], GradNormLoRPAdamW]:
    model = weight_norm_model()
    optimizer = weight_norm_optimizer(model, bits)
    for step in range(STEPS):
        optimizer.zero_grad()
        model(inputs(step)).square().mean().backward()
        with default_device(meta):
            optimizer.step()
    return flat(model), optimizer


@pytest.mark.parametrize("bits", [32, 8])
def test_weight_norm_model_step(bits):
    weights, optimizer = run_weight_norm(True, bits)
    expected, expected_optimizer = run_weight_norm(False, bits)
    assert_same_and_on_cpu(weights, expected)
    assert_same_and_on_cpu(state_tensors(optimizer), state_tensors(expected_optimizer))
    assert not all(torch.equal(a, b) for a, b in zip(weights, flat(weight_norm_model())))


class MetaDefaultPerLayer(PerLayerUpdates):
    """Per-layer updates whose hooks run with the meta default device: the autograd engine does
    not carry the caller's default-device mode into post-accumulate-grad hooks."""

    def _hook(self, param: torch.Tensor) -> None:
        with torch.device("meta"):
            super()._hook(param)


def per_layer_updates(meta: bool, optimizer: GradNormLoRPAdamW, **kwargs) -> PerLayerUpdates:
    return (MetaDefaultPerLayer if meta else PerLayerUpdates)(optimizer, **kwargs)


def run_per_layer(meta: bool, bits: int) -> tuple[list[torch.Tensor], GradNormLoRPAdamW]:
    model = weight_norm_model()
    optimizer = weight_norm_optimizer(model, bits)
    with per_layer_updates(meta, optimizer, accumulation_steps=2, max_grad_norm=0.5):
        for step in range(STEPS):
            for micro in range(2):
                loss = model(inputs(step, micro)).square().mean() / 2
                with default_device(meta):
                    loss.backward()  # the hooks step the parameters in here
    return flat(model), optimizer


@pytest.mark.parametrize("bits", [32, 8])
def test_per_layer_updates_with_accumulation(bits):
    weights, optimizer = run_per_layer(True, bits)
    expected, expected_optimizer = run_per_layer(False, bits)
    assert_same_and_on_cpu(weights, expected)
    assert_same_and_on_cpu(state_tensors(optimizer), state_tensors(expected_optimizer))
    assert not all(torch.equal(a, b) for a, b in zip(weights, flat(weight_norm_model())))


def run_resumed(meta: bool, bits: int) -> tuple[list[torch.Tensor], GradNormLoRPAdamW]:
    projected, dense = make_params()
    optimizer = GradNormLoRPAdamW(groups(projected, dense), lr=1e-2, bits=bits)
    for step in range(2):
        set_grads(projected + dense, step)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [nn.Parameter(p.detach().clone()) for p in projected + dense]
    fresh = GradNormLoRPAdamW(groups(resumed[:3], resumed[3:]), lr=1e-2, bits=bits)
    with default_device(meta):
        fresh.load_state_dict(saved)
    for step in range(2, 4):  # step 2 refreshes, step 3 does not
        set_grads(resumed, step)
        with default_device(meta):
            fresh.step()
    return [p.detach().clone() for p in resumed], fresh


@pytest.mark.parametrize("bits", [32, 8])
def test_load_state_dict_then_step(bits):
    weights, optimizer = run_resumed(True, bits)
    expected, expected_optimizer = run_resumed(False, bits)
    assert_same_and_on_cpu(weights, expected)
    assert_same_and_on_cpu(state_tensors(optimizer), state_tensors(expected_optimizer))


def test_clip_on_device_keeps_the_host_coefficient():
    gen = torch.Generator().manual_seed(3)
    for scale in (1e-3, 0.3, 1.0, 7.0, 1e4):
        for dtype in (torch.float32, torch.bfloat16):
            tensor = (torch.randn(37, 11, generator=gen) * scale).to(dtype)
            expected = tensor.clone()
            coefficient = 1.0 / (float(expected.norm()) + 1e-6)  # the former host computation
            if coefficient < 1.0:
                expected.mul_(coefficient)
            with torch.device("meta"):
                clip_by_norm_(tensor, 1.0)
            assert torch.equal(tensor, expected), (scale, dtype)


# ---------------------------------------------------------------- the ZeRO fragment driver


class FakeFlatLayout:
    """An engine that flattened a group into one 1-D tensor: this rank's run ``[lo, hi)`` of the
    concatenation of the group's parameters (runs cut through rows and through tensors, as
    ZeRO-1/2 does); the run is marked by a ``fake_partition`` attribute on the flat tensor."""

    replicated = False
    averaged = True
    row_aligned = False
    flattened = True

    def has_gradient(self, param):
        return True

    def check_group(self, group, group_index):
        return None

    def state_for_saving(self, param, group, state):
        return state

    def state_from_loading(self, param, group, state):
        return state

    name = "fake flat layout"

    def true_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        return tuple(param.shape)

    def fragments(self, params, engine_params, rank, world_size):
        (flat_param,) = engine_params
        lo, hi = flat_param.fake_partition
        fragments, offset = [], 0
        for param in params:
            numel = param.tensor.numel()
            start, stop = max(lo, offset), min(hi, offset + numel)
            if start >= stop:
                fragments.append(None)
            else:
                fragments.append(
                    Fragment(
                        start=start - offset,
                        numel=stop - start,
                        grad=flat_param.grad.narrow(0, start - lo, stop - start),
                        master=flat_param.data.narrow(0, start - lo, stop - start),
                    )
                )
            offset += numel
        return fragments


def detect_fake_layout(model_params, engine_params):
    if len(engine_params) == 1 and hasattr(engine_params[0], "fake_partition"):
        return FakeFlatLayout()
    return None


@contextlib.contextmanager
def fake_engine_layout():
    """The fake engine's layout beside the real ones while inside: the table is restored after,
    so nothing outside meets it (it claims only ``fake_partition`` tensors). Forked ranks
    (tests/distributed/test_device_rule.py) enter it through :func:`run_fragments`."""
    saved = engine_layouts()
    use_engine_layouts(*saved, detect_fake_layout)
    try:
        yield
    finally:
        use_engine_layouts(*saved)


@pytest.fixture(autouse=True)
def fake_engine():
    with fake_engine_layout():
        yield


def flatten_group(group: dict, lo: int, hi: int) -> nn.Parameter:
    """What the engine does: the group's params replaced by this rank's flat run of them."""
    whole = torch.cat([p.detach().reshape(-1) for p in group["params"]])
    flat_param = nn.Parameter(whole[lo:hi].clone())
    flat_param.fake_partition = (lo, hi)
    group["params"] = [flat_param]
    return flat_param


def set_flat_grads(flats, step: int) -> None:
    """The gradients :func:`set_grads` gives the unflattened parameters, cut like the runs."""
    all_params = [p for _flat, model_params in flats for p in model_params]
    set_grads(all_params, step)
    for flat_param, model_params in flats:
        whole = torch.cat([p.grad.reshape(-1) for p in model_params])
        lo, hi = flat_param.fake_partition
        flat_param.grad = whole[lo:hi].clone()
    for param in all_params:
        param.grad = None


def partition(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s run of ``numel`` elements cut in ``world_size`` (odd cut points)."""
    size = -(-numel // world_size)
    return rank * size, min(numel, (rank + 1) * size)


def run_fragments(meta, bits, communicator, proj_type="std", steps=STEPS):
    """ZeRO-style steps of both groups through the fragment driver on this rank's runs."""
    with fake_engine_layout():
        return _run_fragments(meta, bits, communicator, proj_type, steps)


def _run_fragments(meta, bits, communicator, proj_type, steps):
    projected, dense = make_params()
    optimizer = GradNormLoRPAdamW(
        groups(projected, dense, proj_type),
        lr=1e-2,
        weight_decay=0.01,
        bits=bits,
        communicator=communicator,
    )
    rank, world = communicator.rank, communicator.world_size
    flats = []
    for group, model_params in zip(optimizer.param_groups, (projected, dense)):
        numel = sum(p.numel() for p in model_params)
        flats.append((flatten_group(group, *partition(numel, rank, world)), model_params))
    for step in range(steps):
        set_flat_grads(flats, step)
        with default_device(meta):
            optimizer.step()
    return [f.detach().clone() for f, _ in flats], optimizer


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("proj_type", ["std", "left"])
def test_fragment_driver_one_rank(bits, proj_type):
    weights, optimizer = run_fragments(True, bits, LocalCommunicator(), proj_type)
    expected, expected_optimizer = run_fragments(False, bits, LocalCommunicator(), proj_type)
    assert_same_and_on_cpu(weights, expected)
    assert_same_and_on_cpu(state_tensors(optimizer), state_tensors(expected_optimizer))
    # The fragment path did the one-process math: same weights as the unflattened step.
    unflattened, _ = run_steps(False, bits, proj_type, "svd")
    torch.testing.assert_close(
        weights[0], torch.cat([w.reshape(-1) for w in unflattened[:3]]), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        weights[1], torch.cat([w.reshape(-1) for w in unflattened[3:]]), rtol=1e-5, atol=1e-6
    )


def test_fragment_state_loaded_from_disk_follows_the_fragments():
    """Merged ZeRO state (as read from disk, on the CPU) adopted at the first step, then used."""
    from gnlorp_dist.optim.fragment_state import export_flattened_state, merge_flattened_states

    _, saved_optimizer = run_fragments(False, 32, LocalCommunicator(), steps=1)
    pending = merge_flattened_states([export_flattened_state(saved_optimizer)])

    def resume(meta):
        projected, dense = make_params()
        optimizer = GradNormLoRPAdamW(groups(projected, dense), lr=1e-2, weight_decay=0.01)
        optimizer.load_engine_state(copy.deepcopy(pending))
        flats = []
        for group, model_params in zip(optimizer.param_groups, (projected, dense)):
            numel = sum(p.numel() for p in model_params)
            flats.append((flatten_group(group, 0, numel), model_params))
        for step in range(1, 3):
            set_flat_grads(flats, step)
            with default_device(meta):
                optimizer.step()
        return [f.detach().clone() for f, _ in flats], optimizer

    weights, optimizer = resume(True)
    expected, expected_optimizer = resume(False)
    assert_same_and_on_cpu(weights, expected)
    assert_same_and_on_cpu(state_tensors(optimizer), state_tensors(expected_optimizer))


def run_sharded_resume(meta: bool, directory) -> list[torch.Tensor]:
    """A sharded checkpoint (gnlorp_dist.distributed) read back and stepped from."""
    from gnlorp_dist.distributed import load_sharded_optimizer, save_sharded_optimizer

    projected, dense = make_params()
    optimizer = GradNormLoRPAdamW(groups(projected, dense), lr=1e-2, bits=8)
    for step in range(2):
        set_grads(projected + dense, step)
        optimizer.step()
    save_sharded_optimizer(optimizer, directory)
    fresh = GradNormLoRPAdamW(groups(projected, dense), lr=1e-2, bits=8)
    with default_device(meta):
        load_sharded_optimizer(fresh, directory)
    set_grads(projected + dense, 2)
    with default_device(meta):
        fresh.step()
    return [p.detach().clone() for p in projected + dense] + state_tensors(fresh)


def test_sharded_checkpoint_load_then_step(tmp_path):
    got = run_sharded_resume(True, tmp_path / "meta")
    assert_same_and_on_cpu(got, run_sharded_resume(False, tmp_path / "plain"))
