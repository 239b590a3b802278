"""The merged final model, written tensor by tensor: never a second whole model in memory.

:func:`save_merged_model` deep-copies the model, merges the copy and calls ``save_pretrained``
(gnlorp-finetune's small models). At the end of a sharded run (DeepSpeed, FSDP2) ``gnlorp-train``
used to rebuild a whole fp32 model on the host first (27 GB at 7B, beside the engine's copy).
:func:`save_merged_streamed` instead lays the safetensors header out from the shapes alone,
then, module by module, gathers the module's parameters whole (``gather``: a collective under
ZeRO and FSDP2, so every rank iterates), merges a weight-normalised layer with the layer's own
``merged_weight`` (the same operations as ``merge_weight_norm``, so the same bits), casts to the
saved dtype, writes the bytes at their offset and drops them. At most one module's tensors are
alive at once. The folder holds what ``save_pretrained`` writes (``config.json``, the generation
config, ``model.safetensors``) plus the tokenizer and ``gnlorp_train.json``, swapped in
atomically.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gnlorp_dist.checkpoint.space import disk_full_error, is_disk_full, stale_final_tmps
from gnlorp_dist.checkpoint.store import (
    FINAL_SUBDIR,
    MODEL_FILE,
    _fsync_dir,
    _fsync_file,
    _json_save,
)
from gnlorp_dist.nn import WeightNormLinear

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

Gather = Callable[[nn.Parameter], Tensor]
"""The whole value of one parameter (a collective for sharded parameters)."""


def whole_shape(param: Tensor) -> tuple[int, ...]:
    """A parameter's shape before any engine partitioned it (ZeRO-3 keeps it in ``ds_shape``;
    a DTensor reports its global shape)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _entries(model: nn.Module, merge: bool) -> Iterator[tuple[str, nn.Module, str | None]]:
    """``(saved name, module, parameter name)`` in the order the tensors are produced; a merged
    layer's weight has parameter name None. A tied parameter is saved once, under its first
    name (as ``save_pretrained`` drops the tied copy)."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if merge and isinstance(module, WeightNormLinear):
            yield f"{dot}weight", module, None
            if module.bias is not None:
                yield f"{dot}bias", module, "bias"
            continue
        for name, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield f"{dot}{name}", module, name
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield f"{dot}{name}", module, name


def merged_layout(model: nn.Module, dtype: torch.dtype, merge: bool) -> dict[str, tuple]:
    """Each saved tensor's ``(shape, dtype)``, from the shapes alone (nothing gathered)."""
    layout: dict[str, tuple] = {}
    for key, module, name in _entries(model, merge):
        if name is None:
            shape: tuple[int, ...] = (module.out_features, module.in_features)
        else:
            tensor = module._parameters.get(name)
            tensor = module._buffers[name] if tensor is None else tensor
            shape = whole_shape(tensor)
        layout[key] = (shape, dtype)
    return layout


def merged_tensors(
    model: nn.Module, gather: Gather, dtype: torch.dtype, device: torch.device, merge: bool
) -> Iterator[tuple[str, Tensor]]:
    """The saved tensors, one module's worth alive at a time, on ``device`` in ``dtype``."""
    pending: dict[str, Tensor] = {}
    current: nn.Module | None = None
    for key, module, name in _entries(model, merge):
        if module is not current:
            pending.clear()  # the last module's tensors die before the next one is gathered
            pending, current = _gathered(module, gather, device, merge), module
        value = pending.pop("weight" if name is None else name)
        yield key, value.to(dtype)
        del value  # the writer has it on disk
    pending.clear()


@torch.no_grad()
def _gathered(module: nn.Module, gather: Gather, device: torch.device, merge: bool):
    tensors = {
        name: gather(param).to(device)
        for name, param in module._parameters.items()
        if param is not None
    }
    tensors.update({n: b for n, b in module._buffers.items() if b is not None})
    if merge and isinstance(module, WeightNormLinear):
        # The layer's own merge on the whole tensors: a shallow copy sees them as parameters.
        whole = copy.copy(module)
        whole._parameters = dict(tensors)  # type: ignore[assignment]
        return {"weight": whole.merged_weight(), "bias": tensors.get("bias")}
    return tensors


def write_safetensors(
    path: Path, layout: dict[str, tuple], tensors: Iterator[tuple[str, Tensor]]
) -> None:
    """A safetensors file whose header comes from ``layout`` (name: shape, dtype), each tensor
    of ``tensors`` written at its offset as it arrives; every name must arrive once."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in sorted(layout):
        shape, dtype = layout[key]
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    written: set[str] = set()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(start + offset)
        for key, tensor in tensors:
            shape, dtype = layout[key]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype or key in written:
                raise ValueError(f"{key}: {tuple(tensor.shape)} {tensor.dtype}, laid out {shape}")
            begin = header[key]["data_offsets"][0]
            handle.seek(start + begin)
            data = tensor.detach().contiguous().reshape(-1).cpu().view(torch.uint8)
            handle.write(data.numpy().tobytes())
            written.add(key)
            del tensor, data  # not alive while the next module is gathered
    if written != set(layout):
        raise ValueError(f"tensors never produced: {sorted(set(layout) - written)[:5]}")


def save_merged_streamed(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    gather: Gather | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    merge: bool = True,
    tokenizer: Any = None,
    info: dict[str, Any] | None = None,
    write: bool = True,
) -> Path | None:
    """``output_dir/final``: the (merged) model as ``save_pretrained`` would write it, streamed.

    Every rank of a sharded model calls it (``gather`` is a collective); only ``write=True``
    writes, the others just take part. ``dtype``: the saved dtype (default: the model's);
    ``device``: where the gathered tensors are merged (default: where they are)."""
    gather = gather or (lambda param: param.detach())
    dtype = dtype or next(model.parameters()).dtype
    layout = merged_layout(model, dtype, merge)
    device = device or next(model.parameters()).device
    tensors = merged_tensors(model, gather, dtype, device, merge)
    if not write:
        for _ in tensors:  # the collectives, in the same order as the writing rank
            pass
        return None
    final, tmp = fresh_final_tmp(output_dir)
    with _disk_full_removes(tmp):
        write_safetensors(tmp / MODEL_FILE, layout, tensors)
        _save_configs(model, tmp, dtype)
        return publish_final(tmp, final, tokenizer=tokenizer, info=info)


def _save_configs(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """``config.json`` and ``generation_config.json`` as ``save_pretrained`` writes them."""
    config = copy.deepcopy(model.config)  # type: ignore[union-attr]
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(folder))


@torch.no_grad()
def model_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """``model``'s float logits on ``ids`` (a collective forward when the model is sharded)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids.to(device), use_cache=False).logits.float()
    model.train(was_training)
    return logits


def reloaded_logit_difference(ours: Tensor, final_dir: Path, ids: Tensor) -> float:
    """Max |logit difference| between ``ours`` (the trained model's :func:`model_logits` on
    ``ids``) and the merged model in ``final_dir`` reloaded with stock transformers."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    reloaded = AutoModelForCausalLM.from_pretrained(str(final_dir), local_files_only=True)
    theirs = model_logits(reloaded.to(ours.device), ids)
    return float((ours - theirs).abs().max())


def save_merged_model(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    merge: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    tokenizer: Any = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Save ``merge(copy of model)`` with ``save_pretrained`` (safetensors) and the tokenizer to
    ``output_dir/final``, atomically. The training model is left untouched."""
    final, tmp = fresh_final_tmp(output_dir)
    merged = copy.deepcopy(model)
    if merge is not None:
        merged = merge(merged)
    with _disk_full_removes(tmp):
        merged.save_pretrained(str(tmp), safe_serialization=True)
        return publish_final(tmp, final, tokenizer=tokenizer, info=info)


def fresh_final_tmp(output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``(output_dir/final, an empty temporary folder beside it)`` for a final model to be
    written into, then published by :func:`publish_final`. The temporaries of writers that no
    longer run (a kill during a final save) are removed first."""
    final = Path(output_dir) / FINAL_SUBDIR
    tmp = final.with_name(f"{FINAL_SUBDIR}.tmp-{os.getpid()}")
    for stale in stale_final_tmps(final.parent):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    return final, tmp


@contextlib.contextmanager
def _disk_full_removes(tmp: Path) -> Iterator[None]:
    """A full disk while the final model is written into ``tmp`` removes it and raises
    :class:`~gnlorp_dist.checkpoint.space.DiskFullError`; other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        kept = "the checkpoints are kept (the same command writes the final model again)"
        raise disk_full_error(tmp, "the final model", err, kept=kept, remove=True) from err


def publish_final(
    tmp: Path, final: Path, *, tokenizer: Any = None, info: dict[str, Any] | None = None
) -> Path:
    """Add the tokenizer and ``info`` to ``tmp``, sync it, and put it in ``final``'s place
    atomically (a crash leaves the old final model or the new one, never half of one)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if info is not None:
        _json_save(info, tmp / "gnlorp_train.json")
    for file in tmp.iterdir():
        if file.is_file():
            _fsync_file(file)
    _fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f"{FINAL_SUBDIR}.old-tmp-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final
