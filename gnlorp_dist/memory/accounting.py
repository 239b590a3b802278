"""Exact live-tensor accounting of one real training step (the measurement the estimator is
held against).

A :class:`LiveTensorTracker` (a ``TorchDispatchMode``) sees every tensor an aten operator
produces, forward, backward (the autograd engine runs CPU backward on the calling thread, with
the mode active) and inside the optimizer. It counts each storage once, when it first appears,
and uncounts it when the storage is freed (a ``weakref.finalize`` on the storage: PyTorch keeps
one Python object per storage, so the callback fires when the memory goes back to the
allocator). Views and in-place results share their input's storage and cost nothing. The
running sum is therefore the bytes of live tensor storage, exactly, at every operator boundary;
what it cannot see is scratch memory a kernel allocates and frees internally (LAPACK workspace,
oneDNN buffers) and the caching allocator's rounding on a GPU.

At each new peak the tracker snapshots which storages are live, and the step classifies them:

- ``weights``: parameters and buffers of the model;
- ``gradients``: storages that are some parameter's ``.grad`` at that moment;
- ``optimizer_states``: tensors in ``optimizer.state`` other than the two below;
- ``projection``: the projection matrices (``state["proj"]``, and ``state["proj_scale"]`` for
  quantised bases);
- ``accumulation_buffers``: per-layer low-rank gradient sums (``state["low_rank_grad_sum"]``);
- ``activations``: storages autograd saved for backward (seen by a ``saved_tensors_hooks``
  pack hook, parameters excluded), plus storages created in the forward pass that are still
  alive when it ends (what activation checkpointing keeps: the layer inputs);
- ``inputs``: the batch;
- ``temporaries``: everything else (logits and loss buffers, gradients of activations in the
  backward pass, the optimizer's workspace).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gnlorp_dist.memory.arithmetic import model_shape
from gnlorp_dist.memory.bytes import STATE_KINDS, entry_kind
from gnlorp_dist.memory.config import MemoryConfig
from gnlorp_dist.memory.estimator import COMPONENTS
from gnlorp_dist.models import build_model, llama_config
from gnlorp_dist.nn import apply_weight_norm
from gnlorp_dist.optim import GradNormLoRPAdamW, PerLayerUpdates, projected_param_groups


def _storage_key(tensor: Tensor) -> tuple[Any, int, int] | None:
    if tensor.device.type == "meta" or tensor.is_sparse:
        return None
    storage = tensor.untyped_storage()
    return storage, storage._cdata, storage.nbytes()


class LiveTensorTracker(TorchDispatchMode):
    """Bytes of live tensor storage at every operator boundary, and the live set at the peak.

    ``phase`` is a label the caller sets ("forward", "backward", "step"); the peak remembers
    the phase and the operator that reached it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_live: dict[int, int] = {}
        self.peak_phase = ""
        self.peak_op = ""
        self.peak_extra: Any = None
        self.phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self.created: dict[int, str] = {}
        """Phase in which each live storage was created (``"setup"`` for pre-existing ones)."""
        self.saved: set[int] = set()
        """Live storages that autograd saved for backward (see :class:`_StepProbe`)."""
        self.activations: set[int] = set()
        """Live storages classified as activations at the end of a forward pass."""
        self.snapshot_hook: Any = None
        """Called at every new peak; its return value is kept as ``peak_extra``."""
        self._finalizers: list[weakref.finalize] = []

    def track(self, tensor: Tensor) -> None:
        """Count ``tensor``'s storage if it is not counted yet (pre-existing tensors)."""
        found = _storage_key(tensor)
        if found is None:
            return
        storage, key, nbytes = found
        if key in self.live:
            if self.live[key] != nbytes:  # resized in place (an out= kernel)
                self.current += nbytes - self.live[key]
                self.live[key] = nbytes
            return
        self.live[key] = nbytes
        self.created[key] = self.phase
        self.current += nbytes
        self._finalizers.append(weakref.finalize(storage, self._free, key))

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.created.pop(key, None)
        self.saved.discard(key)
        self.activations.discard(key)

    def _note_peak(self, op: str) -> None:
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_live = dict(self.live)
            self.peak_phase = self.phase
            self.peak_op = op
            if self.snapshot_hook is not None:
                self.peak_extra = self.snapshot_hook()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        # Stop counting: the parameters' and states' storages outlive the measurement, and
        # their callbacks would keep this tracker (and its snapshots) alive with them.
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, Tensor):
                self.track(value)
        self._note_peak(str(func.overloadpacket.__name__))
        return out


@dataclass(kw_only=True)
class MeasuredMemory:
    """Live-tensor bytes of one measured training step."""

    peak_bytes: int
    """Highest sum of live tensor storage bytes seen at an operator boundary."""
    peak_phase: str
    """Where the peak happened: "forward", "backward" or "step"."""
    peak_op: str
    """The aten operator whose outputs reached the peak."""
    breakdown: dict[str, int]
    """The live bytes at the peak, by component (keys: :data:`COMPONENTS`); sums to the peak."""
    phase_peaks: dict[str, int]
    """Highest live bytes within each phase."""
    full_gradient_bytes: int
    """Bytes of one gradient per trainable parameter (the full gradient set)."""
    saved_activation_bytes: int
    """Bytes of the distinct storages autograd saved for backward (parameters excluded), alive
    at the end of the last micro-batch's forward pass."""
    peak_gradient_bytes: int
    """Highest bytes of live ``.grad`` tensors right after any gradient accumulation."""
    cuda_max_memory_allocated: int | None = None
    """``torch.cuda.max_memory_allocated`` over the step (CUDA runs only)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "peak_op": self.peak_op,
            "breakdown": dict(self.breakdown),
            "phase_peaks": dict(self.phase_peaks),
            "full_gradient_bytes": self.full_gradient_bytes,
            "saved_activation_bytes": self.saved_activation_bytes,
            "peak_gradient_bytes": self.peak_gradient_bytes,
            "cuda_max_memory_allocated": self.cuda_max_memory_allocated,
        }


def _keys(tensors: Sequence[Tensor]) -> set[int]:
    keys = set()
    for tensor in tensors:
        found = _storage_key(tensor)
        if found is not None:
            keys.add(found[1])
    return keys


def _state_keys(optimizer: torch.optim.Optimizer) -> dict[str, set[int]]:
    """The storages of the optimizer's state tensors by kind (:func:`entry_kind`)."""
    by_kind: dict[str, set[int]] = {kind: set() for kind in STATE_KINDS}
    for state in optimizer.state.values():
        for name, value in state.items():
            if isinstance(value, Tensor):
                by_kind[entry_kind(name)] |= _keys([value])
    return by_kind


def _micro_batches(batch: Any) -> list[dict[str, Tensor]]:
    if isinstance(batch, dict):
        return [batch]
    if isinstance(batch, Tensor):
        return [{"input_ids": batch, "labels": batch}]
    out = []
    for item in batch:
        out.extend(_micro_batches(item))
    return out


class _StepProbe:
    """What one training step exposes to the accounting: phases, saved tensors, grad bytes."""

    def __init__(self, trainable: list[Tensor]) -> None:
        self.trainable = trainable
        self.tracker: LiveTensorTracker | None = None
        self.forward_end_saved_bytes = 0
        self.peak_gradient_bytes = 0
        self.excluded: set[int] = set()

    def grad_keys(self) -> set[int]:
        return _keys([p.grad for p in self.trainable if p.grad is not None])

    def set_phase(self, phase: str) -> None:
        if self.tracker is not None:
            self.tracker.phase = phase

    def pack(self, tensor: Tensor) -> Tensor:
        if self.tracker is not None:
            self.tracker.saved |= _keys([tensor]) & self.tracker.live.keys()
        return tensor

    def forward_ended(self) -> None:
        tracker = self.tracker
        if tracker is None:
            return
        saved_alive = tracker.saved - self.excluded
        created = {k for k, phase in tracker.created.items() if phase == "forward"}
        tracker.activations |= saved_alive | (created - self.excluded)
        self.forward_end_saved_bytes = sum(tracker.live[k] for k in saved_alive)

    def on_grad(self, _param: Tensor) -> None:
        # Registered before the per-layer hooks, so it sees each gradient before they free it.
        tracker = self.tracker
        if tracker is not None:
            total = sum(tracker.live.get(key, 0) for key in self.grad_keys())
            self.peak_gradient_bytes = max(self.peak_gradient_bytes, total)


def measure_training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Tensor | dict[str, Tensor] | Sequence[Tensor | dict[str, Tensor]],
    *,
    per_layer: bool = False,
    warmup_steps: int = 1,
    max_grad_norm: float = 0.0,
) -> MeasuredMemory:
    """Run ``warmup_steps`` untracked training steps, then one tracked step, and account it.

    ``batch`` is one micro-batch (a token tensor used as input and labels, or a dict of model
    keyword arguments) or a sequence of them (gradient accumulation over ``len(batch)``
    micro-batches). The step is what ``gnlorp-train`` runs: gradients set to None, then for
    each micro-batch ``model(**mb).loss / k`` and ``backward()``, then ``optimizer.step()`` and
    gradients set to None (with ``per_layer=True`` a :class:`PerLayerUpdates` is attached for
    the call and the parameters update inside the backward pass instead). Warm-up steps create
    the optimizer states and projection matrices, so the tracked step is a steady-state step;
    whether it refreshes the subspaces is up to the groups' ``update_proj_gap`` (1: every step).

    ``max_grad_norm > 0``: ``clip_grad_norm_`` before the step (normal path) or per-parameter
    clipping (per-layer path), as the trainer does.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0")
    micro = _micro_batches(batch)
    if not micro:
        raise ValueError("batch holds no micro-batch")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    probe = _StepProbe([p for p in params if p.requires_grad])
    handles = [p.register_post_accumulate_grad_hook(probe.on_grad) for p in probe.trainable]
    attached = None
    try:
        if per_layer:
            attached = PerLayerUpdates(
                optimizer, accumulation_steps=len(micro), max_grad_norm=max_grad_norm
            )
        model.train()
        for _ in range(warmup_steps):
            _training_step(model, optimizer, micro, per_layer, max_grad_norm, probe)
        return _tracked_step(model, optimizer, micro, per_layer, max_grad_norm, probe)
    finally:
        for handle in handles:
            handle.remove()
        if attached is not None:
            attached.remove()


def _training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro: list[dict[str, Tensor]],
    per_layer: bool,
    max_grad_norm: float,
    probe: _StepProbe,
) -> None:
    optimizer.zero_grad(set_to_none=True)
    for mb in micro:
        probe.set_phase("forward")
        with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda tensor: tensor):
            loss = model(**mb, use_cache=False).loss / len(micro)
        probe.forward_ended()
        probe.set_phase("backward")
        loss.backward()
        del loss
    probe.set_phase("step")
    if not per_layer:
        if max_grad_norm > 0:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _tracked_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro: list[dict[str, Tensor]],
    per_layer: bool,
    max_grad_norm: float,
    probe: _StepProbe,
) -> MeasuredMemory:
    cuda = any(p.is_cuda for p in probe.trainable)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model_tensors = list(model.parameters()) + list(model.buffers())
    input_tensors = [t for mb in micro for t in mb.values() if isinstance(t, Tensor)]
    optimizer.zero_grad(set_to_none=True)
    tracker = _start_tracker(optimizer, model_tensors + input_tensors, probe)
    param_keys = _keys(model_tensors)
    input_keys = _keys(input_tensors)
    probe.excluded = param_keys | input_keys
    probe.tracker = tracker
    try:
        with tracker:
            _training_step(model, optimizer, micro, per_layer, max_grad_norm, probe)
    finally:
        probe.tracker = None
    cuda_peak = None
    if cuda:
        torch.cuda.synchronize()
        cuda_peak = int(torch.cuda.max_memory_allocated())
    breakdown = _peak_breakdown(tracker, param_keys, input_keys)
    return MeasuredMemory(
        peak_bytes=tracker.peak,
        peak_phase=tracker.peak_phase,
        peak_op=tracker.peak_op,
        breakdown=breakdown,
        phase_peaks={k: v for k, v in tracker.phase_peaks.items() if k != "setup"},
        full_gradient_bytes=sum(p.numel() * p.element_size() for p in probe.trainable),
        saved_activation_bytes=probe.forward_end_saved_bytes,
        peak_gradient_bytes=max(probe.peak_gradient_bytes, breakdown["gradients"]),
        cuda_max_memory_allocated=cuda_peak,
    )


def _start_tracker(
    optimizer: torch.optim.Optimizer, existing: list[Tensor], probe: _StepProbe
) -> LiveTensorTracker:
    """A tracker that counts the tensors alive before the step (weights, buffers, the batch,
    the optimizer's states) and, at each new peak, snapshots which storages are gradients,
    which are state of each kind and which are activations."""
    tracker = LiveTensorTracker()
    for tensor in existing:
        tracker.track(tensor)
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                tracker.track(value)
    tracker.snapshot_hook = lambda: (
        probe.grad_keys(),
        _state_keys(optimizer),
        frozenset(tracker.activations),
    )
    return tracker


def _peak_breakdown(
    tracker: LiveTensorTracker, param_keys: set[int], input_keys: set[int]
) -> dict[str, int]:
    """The live bytes at the tracker's peak by component (:data:`COMPONENTS`)."""
    peak_grads, peak_states, peak_activations = tracker.peak_extra or (set(), {}, set())
    breakdown = dict.fromkeys(COMPONENTS, 0)
    for key, nbytes in tracker.peak_live.items():
        if key in param_keys:
            kind = "weights"
        elif key in peak_grads:
            kind = "gradients"
        elif key in input_keys:
            kind = "inputs"
        else:
            kind = next(
                (name for name, keys in peak_states.items() if key in keys),
                "activations" if key in peak_activations else "temporaries",
            )
        breakdown[kind] += nbytes
    assert sum(breakdown.values()) == tracker.peak, (breakdown, tracker.peak)
    return breakdown


def build_for_config(
    config: MemoryConfig,
    *,
    seed: int = 0,
    update_proj_gap: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, torch.optim.Optimizer, list[Tensor]]:
    """The real model, optimizer and micro-batches that ``config`` describes, on ``device``.

    The projection refreshes every step when ``config.refresh`` (``update_proj_gap=1``), never
    after the first otherwise; the projected groups use scale 0.25 and lr 1e-3 (no effect on
    memory). One process: ``world_size`` must be 1.
    """
    if config.world_size != 1:
        raise ValueError(
            f"world_size={config.world_size}: measurement runs one process; use world_size=1"
        )
    llama = llama_config(config.model)
    llama._attn_implementation = "sdpa"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[config.dtype]
    model = build_model(llama, dtype=dtype, seed=seed).to(device)
    if config.optimizer == "gradnormlorp":
        apply_weight_norm(model)
    if config.activation_checkpointing:
        # transformers' default: non-reentrant torch.utils.checkpoint around every layer
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    optimizer = _optimizer_for_config(config, model, update_proj_gap)
    generator = torch.Generator().manual_seed(seed)
    seq_len = config.seq_len or config.tokens
    micro = [
        torch.randint(
            0, llama.vocab_size, (config.tokens // seq_len, seq_len), generator=generator
        ).to(device)
        for _ in range(config.accumulation_steps)
    ]
    return model, optimizer, micro


def _optimizer_for_config(
    config: MemoryConfig, model: nn.Module, update_proj_gap: int | None
) -> torch.optim.Optimizer:
    """The optimizer ``config`` names over ``model``: GradNormLoRPAdamW (projected groups at
    the recipe's rank unless ``config.rank``), bitsandbytes' AdamW8bit or torch's AdamW."""
    if config.optimizer in ("galore", "gradnormlorp"):
        rank = config.rank
        if rank is None:
            rank = model_shape(config.model, weight_norm=False, projected=False).recipe_rank
        gap = update_proj_gap or (1 if config.refresh else 10**9)
        options: dict[str, Any] = {"svd_method": config.svd_method}
        if config.proj_bits != 16:
            options["proj_bits"] = config.proj_bits
        groups = projected_param_groups(
            model,
            rank=rank,
            update_proj_gap=gap,
            scale=0.25,
            proj_type=config.proj_type,
            **options,
        )
        return GradNormLoRPAdamW(groups, lr=1e-3, bits=config.state_bits)
    if config.state_bits == 8:
        import bitsandbytes as bnb  # noqa: PLC0415

        return bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)


def measure_config(
    config: MemoryConfig, *, seed: int = 0, device: str | torch.device = "cpu"
) -> MeasuredMemory:
    """Build the setup ``config`` describes on ``device`` and measure one steady-state step
    (on CUDA the result also carries ``torch.cuda.max_memory_allocated``)."""
    model, optimizer, micro = build_for_config(config, seed=seed, device=device)
    return measure_training_step(model, optimizer, micro, per_layer=config.per_layer)
