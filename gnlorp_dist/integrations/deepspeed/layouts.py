"""Where DeepSpeed ZeRO keeps each matrix's elements, from its public per-parameter mappings.

- ZeRO 1 and 2 give the client optimizer ONE flat fp32 partition per param group per rank, cut
  through tensors. Each model parameter carries ``_hp_mapping`` (DeepSpeed's tensor-fragment
  mapping, the one behind ``deepspeed.utils.safe_get_full_*``; None where this rank holds none of
  it): ``lp_fragment_address`` is the run inside the flattened parameter,
  ``hp_fragment_address`` where that run sits in this rank's flat partition.
- ZeRO 3 partitions every parameter on its own: ``ds_shape`` is its shape, and this rank holds
  ``ds_tensor.numel()`` elements starting at ``rank * ds_tensor.numel()`` of the zero-padded
  flattened parameter, read and written with ``deepspeed.utils.safe_get_local_grad``,
  ``safe_get_local_fp32_param`` and ``safe_set_local_fp32_param``.

Nothing here patches DeepSpeed; the optimizer asks :func:`detect_deepspeed_layout` what it got.
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from typing import Any

from torch import Tensor

from gnlorp_dist.optim.fragments import Fragment, ModelParameter
from gnlorp_dist.optim.layouts import Layout, LayoutDefaults


class _ZeroLayout(LayoutDefaults):
    """What ZeRO stages share: flat runs cut anywhere, the engine's tensors in the groups."""

    replicated = False
    averaged = True
    row_aligned = False
    flattened = True

    def has_gradient(self, param: Tensor) -> bool:
        return True  # the engine reduced every trainable parameter's gradient into its partition


class Zero12Layout(_ZeroLayout):
    """ZeRO stage 1 or 2: runs of each parameter inside the group's flat fp32 partition."""

    name = "DeepSpeed ZeRO-1/2"

    def true_shape(self, param: Tensor) -> tuple[int, ...]:
        return tuple(param.shape)

    def fragments(
        self, params: list[ModelParameter], engine_params: list[Tensor], rank: int, world_size: int
    ) -> list[Fragment | None]:
        (flat,) = engine_params
        if flat.grad is None:
            raise ValueError(
                "DeepSpeed stepped a ZeRO-1/2 partition that has no gradient; call "
                "engine.backward(loss) before engine.step()"
            )
        fragments: list[Fragment | None] = []
        for param in params:
            mapping = getattr(param.tensor, "_hp_mapping", None)
            if mapping is None:
                fragments.append(None)
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            fragments.append(
                Fragment(
                    start=lp.start,
                    numel=lp.numel,
                    grad=flat.grad.narrow(0, hp.start, hp.numel),
                    master=flat.data.narrow(0, hp.start, hp.numel),
                )
            )
        return fragments


class Zero3Layout(_ZeroLayout):
    """ZeRO stage 3: each parameter split evenly over the ranks, padded at the end."""

    name = "DeepSpeed ZeRO-3"

    def true_shape(self, param: Tensor) -> tuple[int, ...]:
        return tuple(param.ds_shape)

    def fragments(
        self, params: list[ModelParameter], engine_params: list[Tensor], rank: int, world_size: int
    ) -> list[Fragment | None]:
        from deepspeed.utils import (  # noqa: PLC0415  (deepspeed only when it is the engine)
            safe_get_local_fp32_param,
            safe_get_local_grad,
            safe_set_local_fp32_param,
        )

        trainable = [p for p in params if p.tensor.requires_grad]
        held = sum(p.tensor.ds_tensor.numel() for p in trainable)
        (flat,) = engine_params
        if flat.numel() < held:
            raise ValueError(
                f"DeepSpeed ZeRO-3 split a param group ({held:,} elements on this rank) into "
                f"sub-groups of {flat.numel():,}: GradNormLoRPAdamW steps whole groups. Set "
                f'"zero_optimization": {{"sub_group_size": {max(held, int(1e9))}}} or more '
                "(see ds_configs/)"
            )
        fragments: list[Fragment | None] = []
        for param in params:
            tensor = param.tensor
            part = tensor.ds_tensor.numel()
            start = rank * part
            numel = min(part, tensor.ds_numel - start)
            if not tensor.requires_grad or numel <= 0:
                fragments.append(None)
                continue
            master = safe_get_local_fp32_param(tensor)

            def write_back(tensor: Tensor = tensor, master: Tensor = master) -> None:
                safe_set_local_fp32_param(tensor, master)

            fragments.append(
                Fragment(
                    start=start,
                    numel=numel,
                    grad=_clipped_local_grad(tensor, master, flat, safe_get_local_grad),
                    master=master,
                    write_back=write_back,
                )
            )
        return fragments


def _clipped_local_grad(
    tensor: Tensor, master: Tensor, flat: Tensor, get_local_grad: Any
) -> Tensor:
    """This rank's gradient of ``tensor`` as the engine left it for the step: unscaled and clipped.

    Without offload, ``safe_get_local_grad`` (0.19.8) returns the reduced partition from before
    DeepSpeed's clipping, which the engine applies to the flat partition's ``.grad`` only; so the
    run is read from there, where ``safe_get_local_fp32_param``'s view says it sits. With offload
    that view is a copy on another device, and ``safe_get_local_grad`` reads the clipped flat
    gradient itself.
    """
    same_storage = master.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    if flat.grad is not None and same_storage:
        offset = master.storage_offset() - flat.storage_offset()
        return flat.grad.narrow(0, offset, master.numel())
    return get_local_grad(tensor)


TESTED_DEEPSPEED = ("0.19.8",)
"""DeepSpeed versions the layouts were tested with (pyproject pins ``>=0.19.8,<0.20``): they
read per-parameter mappings whose behaviour inside ``step()`` is not a documented contract."""


@functools.cache
def check_deepspeed_version() -> None:
    version = importlib.metadata.version("deepspeed")
    if version not in TESTED_DEEPSPEED:
        warnings.warn(
            f"DeepSpeed {version} is not one of the versions GradNormLoRPAdamW's ZeRO layouts were "
            f"tested with ({', '.join(TESTED_DEEPSPEED)}); run tests/distributed/test_deepspeed.py "
            "with it before training, or install deepspeed==0.19.8",
            stacklevel=2,
        )


def detect_deepspeed_layout(
    model_params: list[Tensor], engine_params: list[Tensor]
) -> Layout | None:
    """The ZeRO layout of a group whose parameters DeepSpeed replaced, or None."""
    layout: Layout | None = None
    if any(hasattr(p, "ds_id") for p in model_params):
        layout = Zero3Layout()
    elif len(engine_params) == 1 and engine_params[0].dim() == 1:
        if any(hasattr(p, "_hp_mapping") for p in model_params):
            layout = Zero12Layout()
    if layout is not None:
        check_deepspeed_version()
    return layout
