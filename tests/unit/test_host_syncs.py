"""Host syncs on the hot path: how many times one optimizer step reads a device value.

A host read is counted wherever the CPU could see it: ``aten._local_scalar_dense`` (what
``.item()``, ``bool()``, ``float()`` and ``int()`` of a tensor dispatch), ``Tensor.tolist`` and
any copy from a non-CPU tensor to the CPU. On a GPU each is a stall of the host until the device
has caught up, so the counts here are the syncs docs/gpu.md ("Host syncs on the hot path")
promises: at most one per step. VLoRP's random bases must be drawn on the parameters' device
(checked with a ``meta`` default device, as in test_device_rule.py).
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gnlorp_dist import GradNormLoRPAdamW, PerLayerUpdates
from gnlorp_dist.optim.projector import BASIS_DEVICE_KEY
from tests.distributed.harness import run_ranks_within
from tests.unit.test_device_rule import per_layer_updates

GAP = 3  # refreshes at steps 0, 3, 6
STEPS = 7


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values (see the module docstring) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._tolist = torch.Tensor.tolist

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = args[0].device if func is torch.ops.aten.copy_.default else None
            target = kwargs.get("device", target)
            if source.device.type != "cpu" and target is not None and target.type == "cpu":
                self.count += 1
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        original = self._tolist

        def tolist(tensor):
            counter.count += 1
            with torch._C.DisableTorchFunctionSubclass():
                return original(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def test_the_counter_sees_item_tolist_and_bool():
    x = torch.arange(3.0)
    with HostReads() as reads:
        x.sum().item()
        x.tolist()
        bool(x[0] > 0)
        y = x * 2  # device work is not a read
    assert reads.count == 3 and y[1] == 2


# -- one process ---------------------------------------------------------------------------


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (12, 20), (20, 12), (20,), (7, 5)]
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _optimizer(params, comm=None, reduction=None, **projection) -> GradNormLoRPAdamW:
    options = {"rank": 4, "update_proj_gap": GAP, "scale": 0.5, "proj_type": "std"}
    options.update(projection)
    groups = [
        {"params": params[:3], "param_names": ["a", "b", "c"], **options},
        {"params": params[3:], "param_names": ["d", "e"]},
    ]
    return GradNormLoRPAdamW(
        groups, lr=1e-2, weight_decay=0.01, communicator=comm, gradient_reduction=reduction
    )


def _set_grads(params, step: int, rank: int = 0) -> None:
    gen = torch.Generator().manual_seed(100 * rank + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _loss(params, step: int, micro: int = 0, rank: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    return sum((p * torch.randn(p.shape, generator=gen)).sum() for p in params) + sum(
        p.square().sum() for p in params
    )


def _reads_per_step(optimizer, params, known_finite=False):
    """Host reads of each of STEPS whole ``step()`` calls on fresh gradients."""
    counts = []
    for step in range(STEPS):
        _set_grads(params, step)
        if known_finite:
            optimizer.mark_gradients_finite()
        with HostReads() as reads:
            optimizer.step()
        counts.append(reads.count)
    return counts


@pytest.mark.parametrize(
    "projection",
    [{}, {"proj_type": "random", "granularity": 2}, {"svd_method": "randomized"}],
    ids=["svd", "vlorp-random", "randomized"],
)
def test_whole_step_reads_once_per_step(projection):
    params = _params()
    optimizer = _optimizer(params, **projection)
    counts = _reads_per_step(optimizer, params)
    assert counts == [1] * STEPS  # the non-finite verdict, refresh steps included


def test_known_finite_gradients_are_not_read():
    params = _params()
    optimizer = _optimizer(params)
    counts = _reads_per_step(optimizer, params, known_finite=True)
    assert counts == [0] * STEPS


def test_lazy_refresh_reads_the_overlap_at_its_refreshes_only():
    params = _params()
    optimizer = _optimizer(params, lazy_refresh_threshold=0.99)
    counts = _reads_per_step(optimizer, params)
    # Step 0: no old basis to compare; step 3 (every subspace moved: random gradients): the
    # verdict plus one overlap per refreshed matrix, on its owner, right after its SVD.
    assert counts == [1, 1, 1, 1 + 3, 1, 1, 1 + 3]


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("projection", [{}, {"proj_type": "random"}], ids=["svd", "random"])
def test_per_layer_reads_once_per_step(accumulation, projection):
    params = _params()
    optimizer = _optimizer(params, **projection)
    counts = []
    with PerLayerUpdates(optimizer, accumulation_steps=accumulation):
        for step in range(STEPS):
            with HostReads() as reads:
                for micro in range(accumulation):
                    _loss(params, step, micro).backward()
            counts.append(reads.count)
    assert counts == [1] * STEPS  # before: one per projected matrix per micro-batch + one per dense


# -- per-layer non-finite gradients ------------------------------------------------------------


def _per_layer_run(poison: dict[int, set[str]], accumulation: int = 1, steps: int = 5):
    """Per-layer steps; at step s the gradients of the parameters named in ``poison[s]`` get a
    NaN (first micro-batch). Returns the parameters and the message of each error raised."""
    params = _params()
    optimizer = _optimizer(params)
    names = ["a", "b", "c", "d", "e"]
    errors: dict[int, str] = {}
    with PerLayerUpdates(optimizer, accumulation_steps=accumulation):
        for step in range(steps):
            for micro in range(accumulation):
                loss = _loss(params, step, micro)
                bad = poison.get(step, set()) if micro == 0 else set()
                loss = loss + sum((p * math.nan).sum() for p, n in zip(params, names) if n in bad)
                try:
                    loss.backward()
                except ValueError as error:
                    errors[step] = str(error)
    return params, optimizer, errors


@pytest.mark.parametrize("accumulation", [1, 2])
def test_per_layer_non_finite_raises_at_the_end_of_the_step_naming_the_parameters(accumulation):
    params, optimizer, errors = _per_layer_run({4: {"b", "d"}}, accumulation)
    assert list(errors) == [4]
    assert errors[4].startswith("b, d: non-finite gradient in per-layer mode (step 4)")
    # Contained: nothing became NaN, and the run went on after the error.
    assert all(bool(torch.isfinite(p).all()) for p in params)
    for state in optimizer.state.values():
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_tensor(v))
    clean, _clean_opt, clean_errors = _per_layer_run({}, accumulation)
    assert not clean_errors
    # The parameters with finite gradients took exactly the step they would have taken.
    for name, p, q in zip("abcde", params, clean, strict=True):
        assert torch.equal(p, q) == (name not in {"b", "d"}), name


def test_per_layer_non_finite_at_a_refresh_raises_a_clear_error_not_the_svds():
    _params_, _opt, errors = _per_layer_run({3: {"a"}})
    assert list(errors) == [3]
    assert errors[3].startswith("a: non-finite gradient in per-layer mode (step 3, a subspace")


def test_driving_step_parameter_without_reading_the_verdict_is_refused():
    params = _params()
    optimizer = _optimizer(params)
    for step in range(2):
        _set_grads(params, step)
        if step == 1:
            with pytest.raises(ValueError, match="call optimizer.finish_per_layer_step"):
                optimizer.step_parameter(params[0])
            return
        for p in params:
            optimizer.step_parameter(p)


# -- two gloo ranks ----------------------------------------------------------------------------


def _ranks_scenario(rank: int, world_size: int, out) -> None:
    from gnlorp_dist.distributed import ProcessGroupCommunicator  # noqa: PLC0415

    comm = ProcessGroupCommunicator()
    result = {}
    for name, reduction in [("per_layer-full", "full"), ("per_layer-low_rank", "low_rank")]:
        params = _params()
        optimizer = _optimizer(params, comm, reduction)
        counts = []
        with PerLayerUpdates(optimizer, accumulation_steps=2):
            for step in range(STEPS):
                with HostReads() as reads:
                    for micro in range(2):
                        _loss(params, step, micro, rank).backward()
                counts.append(reads.count)
        result[name] = counts
    params = _params()
    optimizer = _optimizer(params, comm)
    counts = []
    for step in range(STEPS):
        _set_grads(params, step)  # the same on every rank: DDP-averaged gradients
        with HostReads() as reads:
            optimizer.step()
        counts.append(reads.count)
    result["ddp"] = counts
    out.put((rank, result))


def test_two_ranks_read_once_per_step():
    queue = torch.multiprocessing.get_context("fork").SimpleQueue()
    run_ranks_within(120, 2, _ranks_scenario, queue)
    results = dict(queue.get() for _ in range(2))
    for rank in range(2):
        assert results[rank] == {
            "per_layer-full": [1] * STEPS,
            "per_layer-low_rank": [1] * STEPS,
            "ddp": [1] * STEPS,
        }, rank


# -- VLoRP random bases on the device ----------------------------------------------------------


def _meta_default(meta: bool):
    return torch.device("meta") if meta else contextlib.nullcontext()


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_random_bases_are_drawn_on_the_parameters_device(kind, per_layer):
    """With the default device ``meta``, a basis drawn anywhere but on the parameter's device
    (a host draw, then a copy) would be a meta tensor and fail; the run must equal the one
    without the meta default bitwise."""

    def run(meta: bool):
        params = _params()
        optimizer = _optimizer(params, proj_type="random", random_basis=kind, granularity=2)
        # The engine does not carry the default device into hooks: they set it themselves.
        with per_layer_updates(meta, optimizer) if per_layer else contextlib.nullcontext():
            for step in range(STEPS):
                if per_layer:
                    loss = _loss(params, step)
                    with _meta_default(meta):
                        loss.backward()
                else:
                    _set_grads(params, step)
                    with _meta_default(meta):
                        optimizer.step()
        return params, optimizer

    params, optimizer = run(True)
    expected, _ = run(False)
    for p, q in zip(params, expected, strict=True):
        assert p.device.type == "cpu" and torch.equal(p, q)
    assert not torch.equal(params[0], _params()[0])
    assert optimizer.param_groups[0][BASIS_DEVICE_KEY] == "cpu"


def _resumed(saved_on: str | None, steps_before: int):
    params = _params()
    optimizer = _optimizer(params, proj_type="random")
    for step in range(steps_before):
        _set_grads(params, step)
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    if saved_on is None:
        del saved["param_groups"][0][BASIS_DEVICE_KEY]  # saved before the record existed
    else:
        saved["param_groups"][0][BASIS_DEVICE_KEY] = saved_on
    resumed = _optimizer(_params(), proj_type="random")
    resumed.load_state_dict(saved)
    for p, q in zip(resumed.param_groups[0]["params"], params):
        p.data.copy_(q.data)
    return resumed


def test_resume_mid_window_on_another_device_type_is_refused():
    resumed = _resumed("cuda", steps_before=4)  # step 4: inside the window of steps 3..5
    params = [p for group in resumed.param_groups for p in group["params"]]
    _set_grads(params, 4)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="drawn on cuda.*Resume on cuda, or resume from a"):
        resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # refused before any change


@pytest.mark.parametrize(("saved_on", "steps_before"), [("cuda", 3), ("cpu", 4), (None, 4)])
def test_resume_at_a_window_start_or_on_the_same_device_type_goes_on(saved_on, steps_before):
    resumed = _resumed(saved_on, steps_before)
    params = [p for group in resumed.param_groups for p in group["params"]]
    _set_grads(params, steps_before)
    resumed.step()  # a new window (drawn on the CPU), or the CPU's window continued
    assert resumed.param_groups[0][BASIS_DEVICE_KEY] == "cpu"
