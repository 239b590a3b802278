"""Block-wise 8-bit optimizer moments on ONE block grid per tensor, updated chunk by chunk.

A quantised moment is two plain tensors kept in the optimizer state: ``<key>`` holds uint8
codes of the moment's shape, ``<key>_absmax`` one float32 scale per block of
:data:`BLOCK_SIZE` elements. Plain tensors keep ``state_dict()`` loadable with
``torch.load(weights_only=True)``. The codes index bitsandbytes' dynamic maps (signed for the
first moment, unsigned for the non-negative second), as bitsandbytes' 8-bit optimizers do.

The grid: block ``b`` of a tensor is its flattened elements ``[b * 256, (b + 1) * 256)``,
wherever its elements live. A run of the tensor (a DDP row block, a ZeRO partition's run, an
FSDP2 shard of rows) starting at element ``offset`` keeps the scales of the blocks it touches,
``offset // 256`` to ``(offset + numel - 1) // 256``; a block cut between two ranks is held by
both, with one scale agreed by the ranks (:func:`shared_block_scales`). So every layout holds
the codes and scales one process would hold, and joining or cutting runs is exact code for code.

The update never dequantises a whole moment: :meth:`MomentStore.chunks` hands the update
functions float32 chunks of :data:`CHUNK_NUMEL` elements (whole blocks) and re-quantises each
before the next one, so the math is the same code at 8 and 32 bits (the torchao pattern) and
the float32 workspace is a few chunks, whatever the tensor's size. The chunks are decoded and
encoded by bitsandbytes' block-wise kernels (CPU and CUDA). Its fused optimizer kernel
(``optimizer_update_8bit_blockwise``) is not used: it applies its own Adam convention
(``eps`` added after ``sqrt(v) / sqrt(1 - b2^t)``) straight to a parameter, while a projected
matrix needs GaLore's direction ``m / (sqrt(v) + eps)`` in low rank before it is projected back,
and neither kernel knows about runs that start inside a block (here: zero padding, and an agreed
scale placed in a pad slot).

Tensors smaller than :data:`MIN_8BIT_NUMEL` stay in float32: their codes would save nothing
next to the block scales. One quantiser (bitsandbytes') serves every layout, so every rank
quantises alike.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

BLOCK_SIZE = 256
MIN_8BIT_NUMEL = 4096
CHUNK_NUMEL = 1 << 18
"""Elements per float32 chunk of an 8-bit update (a multiple of :data:`BLOCK_SIZE`): the
workspace of one update is a few such chunks (:func:`update_workspace_bytes`)."""
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
FIRST_MOMENT_ONLY = ("exp_avg",)
SIGNED = {"exp_avg": True, "exp_avg_sq": False}


def stores_8bit(bits: int, numel: int, min_8bit_size: int = MIN_8BIT_NUMEL) -> bool:
    """Whether a tensor of ``numel`` elements keeps its Adam moments as 8-bit codes: the one
    rule the optimizer, the memory estimator, the preflight and the benchmarks all ask.

    ``bits`` is the group's ``bits`` (8 or 32); tensors under ``min_8bit_size`` elements stay
    float32 (bitsandbytes' ``min_8bit_size`` rule: small tensors gain little and lose most)."""
    return bits == 8 and numel >= min_8bit_size


@functools.cache
def _dynamic_map(signed: bool, device: str) -> Tensor:
    """bitsandbytes' dynamic map (256 sorted values: code k's neighbours are k - 1 and k + 1)."""
    import bitsandbytes.functional as bnbf  # noqa: PLC0415  (4 s import; only for 8-bit runs)

    # bitsandbytes builds the map on the default device; build it on the host (once per device).
    with torch.device("cpu"):
        values = bnbf.create_dynamic_map(signed=signed).float()
    assert values.numel() == 256 and bool((values[1:] >= values[:-1]).all())
    return values.to(device)


def block_span(offset: int, numel: int) -> tuple[int, int]:
    """``(first, stop)``: the grid blocks elements ``[offset, offset + numel)`` touch."""
    return offset // BLOCK_SIZE, -(-(offset + numel) // BLOCK_SIZE)


def _padded(values: Tensor, head: int) -> Tensor:
    """``values`` placed at ``head`` in a zero buffer of whole blocks (a run's view of the grid:
    zeros stand for the other ranks' elements, which never raise a block's local absmax)."""
    blocks = -(-(head + values.numel()) // BLOCK_SIZE)
    if head == 0 and values.numel() == blocks * BLOCK_SIZE:
        return values.reshape(blocks, BLOCK_SIZE)
    buffer = values.new_zeros(blocks * BLOCK_SIZE)
    buffer[head : head + values.numel()] = values.reshape(-1)
    return buffer.view(blocks, BLOCK_SIZE)


def encode(
    values: Tensor, head: int, signed: bool, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)`` of a run's float ``values`` (flat) on the grid: bitsandbytes'
    block-wise kernel (each block's scale is the absmax of its elements here) over the run's
    blocks, zero-padded where the run starts or ends inside one.

    ``scale``: a single block's scale agreed over the ranks that share it (at least the local
    absmax): written into a pad slot (an element another rank holds) so that the kernel takes it
    as the block's absmax, and the codes are those one process computes over the whole block.
    """
    import bitsandbytes.functional as bnbf  # noqa: PLC0415

    padded = _padded(values.float(), head)
    if scale is not None:
        assert padded.shape[0] == 1, "an agreed scale is for one shared block"
        pad = 0 if head > 0 else head + values.numel()
        # A pad slot exists, so _padded built a fresh buffer: writing into it leaves values be.
        assert pad < BLOCK_SIZE, "a shared block has elements on another rank"
        padded.view(-1)[pad] = scale.reshape(())
    code = _dynamic_map(signed, str(values.device))
    codes, quant_state = bnbf.quantize_blockwise(padded.view(-1), code=code, blocksize=BLOCK_SIZE)
    return codes[head : head + values.numel()], quant_state.absmax.float()


def decode(codes: Tensor, absmax: Tensor, head: int, signed: bool) -> Tensor:
    """Float32 values of a run's uint8 ``codes`` (flat) from its blocks' scales."""
    import bitsandbytes.functional as bnbf  # noqa: PLC0415

    flat = codes.reshape(-1)
    blocks = -(-(head + flat.numel()) // BLOCK_SIZE)
    if head or flat.numel() != blocks * BLOCK_SIZE:
        padded = flat.new_zeros(blocks * BLOCK_SIZE)
        padded[head : head + flat.numel()] = flat
        flat = padded
    code = _dynamic_map(signed, str(codes.device))
    values = bnbf.dequantize_blockwise(flat, absmax=absmax, code=code, blocksize=BLOCK_SIZE)
    return values[head : head + codes.numel()]


def quantize_8bit(value: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(codes_uint8, absmax_f32)`` of a whole tensor ``value``."""
    codes, absmax = encode(value.reshape(-1), 0, signed)
    return codes.view(value.shape), absmax


def dequantize_8bit(codes: Tensor, absmax: Tensor, signed: bool, offset: int = 0) -> Tensor:
    """Float32 tensor of ``codes``' shape: a whole tensor, or its run starting at ``offset``."""
    return decode(codes, absmax, offset % BLOCK_SIZE, signed).view(codes.shape)


@dataclass(kw_only=True)
class SharedBlock:
    """A grid block cut between this rank's run and another's: its codes wait for the scale
    the ranks agree on (the largest of their local absmaxes, what one process computes)."""

    state: dict[str, Any]
    """The state holding the codes."""
    block: int
    """Grid index of the block in the whole tensor."""
    position: int
    """Index of the block in the state's scales."""
    elements: tuple[int, int]
    """This run's elements of the block, as ``[start, stop)`` in the run's flat codes."""
    head: int
    """Where the run's first element of the block sits in it."""
    values: dict[str, Tensor]
    """The new float values of this run's part of the block, per moment."""
    absmax: dict[str, float | Tensor]
    """Their local absmax per moment (float32 scalars)."""


class MomentStore:
    """Adam's two moments of one parameter (or one run of it), in float or 8-bit codes.

    ``offset``: the run's first element in the whole parameter (0: the whole tensor), which
    places it on the parameter's block grid; ``param_numel``: the whole parameter's size, which
    decides 8-bit or not (as on one process: at least ``min_numel`` elements, bitsandbytes'
    ``min_8bit_size``) and whether the run's last block is shared.

    A state of the other kind (float moments loaded for an 8-bit tensor, or codes for a float
    one, as a checkpoint or reshard may hand over) is converted by the next :meth:`chunks`.
    """

    def __init__(
        self,
        state: dict[str, Any],
        bits: int,
        param_numel: int | None = None,
        *,
        offset: int = 0,
        min_numel: int = MIN_8BIT_NUMEL,
        keys: tuple[str, ...] = MOMENT_KEYS,
    ) -> None:
        assert bits in (8, 32), bits
        assert keys in (MOMENT_KEYS, FIRST_MOMENT_ONLY), keys
        self.state = state
        self.keys = keys
        """The moments kept: both, or the first only (ProjFactor keeps its second moment
        factored, outside this store): the second is then yielded and loaded as None."""
        self.bits = bits
        self.param_numel = param_numel
        self.offset = offset
        self.min_numel = min_numel
        self.shared: list[SharedBlock] = []
        """Blocks of the latest :meth:`chunks` pass waiting for their agreed scales."""

    @property
    def head(self) -> int:
        return self.offset % BLOCK_SIZE

    def quantised(self, like: Tensor) -> bool:
        numel = self.param_numel if self.param_numel is not None else like.numel()
        return stores_8bit(self.bits, numel, self.min_numel)

    def initialise(self, like: Tensor) -> None:
        for key in self.keys:
            zeros = torch.zeros_like(like, memory_format=torch.contiguous_format)
            if self.quantised(like):
                codes, absmax = encode(zeros.view(-1), self.head, SIGNED[key])
                self.state[key] = codes.view(like.shape)
                self.state[f"{key}_absmax"] = absmax
            else:
                self.state[key] = zeros

    def ensure(self, like: Tensor) -> None:
        """Create the moments as zeros shaped ``like`` the first time."""
        if "exp_avg" not in self.state:
            self.initialise(like)
        assert self.state["exp_avg"].shape == like.shape, (self.state["exp_avg"].shape, like.shape)

    @property
    def is_8bit(self) -> bool:
        return "exp_avg_absmax" in self.state

    def load(self) -> tuple[Tensor, Tensor]:
        """The whole moments as float tensors (a copy for 8-bit state: saving, resharding)."""
        values = []
        for key in self.keys:
            if f"{key}_absmax" in self.state:
                codes, absmax = self.state[key], self.state[f"{key}_absmax"]
                values.append(dequantize_8bit(codes, absmax, SIGNED[key], self.offset))
            else:
                values.append(self.state[key])
        return values[0], (values[1] if len(values) > 1 else None)

    def set_values(self, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        """Create the moments holding these values (quantised if 8-bit, each block's scale from
        these values): a whole tensor's loaded state, as a step would have built it."""
        self.initialise(exp_avg)
        for key, value in zip(self.keys, (exp_avg, exp_avg_sq)):
            if f"{key}_absmax" in self.state:
                flat = value.reshape(-1).float()
                codes, absmax = encode(flat, self.head, SIGNED[key])
                self.state[key].view(-1).copy_(codes)
                self.state[f"{key}_absmax"].copy_(absmax)
            else:
                self.state[key].copy_(value)

    def chunks(self, like: Tensor) -> Iterator[tuple[int, int, Tensor, Tensor]]:
        """``(start, stop, exp_avg, exp_avg_sq)`` over the flattened moments: float32 tensors to
        update in place, each written back (re-quantised) when the loop moves on.

        Float state: one chunk, views of the moments themselves. 8-bit state: chunks of
        :data:`CHUNK_NUMEL` elements on the grid; a block this run shares with another rank is
        left in :attr:`shared` with its new values (see :func:`shared_block_scales`).
        """
        self.ensure(like)
        self.shared = []
        floats = self._adopt_other_kind(like)
        if not self.is_8bit:
            second = self.state["exp_avg_sq"].view(-1) if len(self.keys) > 1 else None
            yield 0, like.numel(), self.state["exp_avg"].view(-1), second
            return
        numel = like.numel()
        codes = {key: self.state[key].view(-1) for key in self.keys}
        scales = {key: self.state[f"{key}_absmax"] for key in self.keys}
        first_block = block_span(self.offset, numel)[0]
        start = 0
        while start < numel:
            # Chunks end on grid boundaries, so every chunk after the first is whole blocks.
            grid_start = (self.offset + start) // BLOCK_SIZE * BLOCK_SIZE
            stop = min(numel, grid_start + CHUNK_NUMEL - self.offset)
            head = (self.offset + start) % BLOCK_SIZE
            block0 = (self.offset + start) // BLOCK_SIZE - first_block
            blocks = slice(block0, block0 + -(-(head + stop - start) // BLOCK_SIZE))
            if floats is None:
                values = {
                    key: decode(codes[key][start:stop], scales[key][blocks], head, SIGNED[key])
                    for key in self.keys
                }
            else:
                values = {key: floats[key][start:stop].float() for key in self.keys}
            yield start, stop, values["exp_avg"], values.get("exp_avg_sq")
            self._write_chunk(codes, scales, values, (start, stop), head, blocks, numel)
            # Nothing of this chunk outlives it: the next one decodes into an empty workspace.
            del values
            start = stop

    def _adopt_other_kind(self, like: Tensor) -> dict[str, Tensor] | None:
        """A state of the other kind made this kind: float moments of an 8-bit tensor (loaded
        from a checkpoint that stores them dequantised, FSDP2's) are returned flat, to be read
        as they are by this pass, which writes codes; codes of a float tensor are decoded."""
        if self.quantised(like) and not self.is_8bit:
            floats = {key: self.state.pop(key).reshape(-1) for key in self.keys}
            self.initialise(like)
            return floats
        if self.is_8bit and not self.quantised(like):
            for key, value in zip(self.keys, self.load()):
                self.state[key] = value.to(like.dtype).view(like.shape)
                del self.state[f"{key}_absmax"]
        return None

    def _write_chunk(
        self,
        codes: dict[str, Tensor],
        scales: dict[str, Tensor],
        values: dict[str, Tensor],
        span: tuple[int, int],
        head: int,
        blocks: slice,
        numel: int,
    ) -> None:
        """Re-quantise one updated chunk (elements ``span`` of the run, grid blocks ``blocks``
        of the run's scales) into the state; a block shared with another rank keeps its old
        codes and scale until the ranks agree on its scale (:attr:`shared`)."""
        start, stop = span
        first_block, stop_block = block_span(self.offset, numel)
        total = self.param_numel if self.param_numel is not None else numel
        end = self.offset + numel
        encoded = {key: encode(values[key], head, SIGNED[key]) for key in self.keys}
        absmax = {key: scale for key, (_codes, scale) in encoded.items()}
        defer = []
        if self.head != 0 and blocks.start == 0:
            defer.append(0)
        if end % BLOCK_SIZE != 0 and end < total and blocks.stop == stop_block - first_block:
            defer.append(blocks.stop - blocks.start - 1)
        for key in self.keys:
            kept = absmax[key].clone()
            for d in defer:  # written once the ranks agree on the scale
                kept[d] = scales[key][blocks][d]
            new_codes = encoded[key][0]
            for d in sorted(set(defer)):
                lo, hi = self._block_elements(d, head, stop - start)
                new_codes[lo:hi] = codes[key][start + lo : start + hi]
            codes[key][start:stop] = new_codes
            scales[key][blocks] = kept
        for d in sorted(set(defer)):
            lo, hi = self._block_elements(d, head, stop - start)
            self.shared.append(
                SharedBlock(
                    state=self.state,
                    block=first_block + blocks.start + d,
                    position=blocks.start + d,
                    elements=(start + lo, start + hi),
                    head=(head if d == 0 else 0),
                    values={key: values[key][lo:hi].clone() for key in self.keys},
                    absmax={key: absmax[key][d] for key in self.keys},
                )
            )

    @staticmethod
    def _block_elements(block: int, head: int, numel: int) -> tuple[int, int]:
        """Elements ``[lo, hi)`` of a chunk (``numel`` elements from ``head``) in its ``block``."""
        lo = max(0, block * BLOCK_SIZE - head)
        hi = min(numel, (block + 1) * BLOCK_SIZE - head)
        return lo, hi


def settle_shared(shared: list[SharedBlock], agreed: dict[tuple[int, str], Tensor]) -> None:
    """Write the deferred codes of one tensor's ``shared`` blocks with their agreed scales
    (``agreed[(block, key)]``: the largest local absmax among the ranks holding the block)."""
    for item in shared:
        lo, hi = item.elements
        for key in item.values:
            scale = agreed[(item.block, key)].reshape(1).to(torch.float32)
            codes, _absmax = encode(item.values[key], item.head, SIGNED[key], scale)
            item.state[key].view(-1)[lo:hi] = codes
            item.state[f"{key}_absmax"][item.position] = scale[0]


def update_workspace_bytes(
    numel: int, bits: int, *, element_size: int = 4, min_numel: int = MIN_8BIT_NUMEL
) -> int:
    """Peak bytes one moment update of ``numel`` elements allocates beyond the moments, the
    gradient and the weights it reads (a whole tensor on one process: the run starts on the
    grid), as the live-tensor accounting measures it (``gnlorp_dist.memory``). The same for the
    dense update (:func:`~gnlorp_dist.optim.dense.update_dense_block`) and the projected one
    (``driver.adam_directions``, whose direction overwrites the gradient).

    Float state (``bits=32``, or under ``min_numel`` elements): one chunk, the moments
    themselves; ``sqrt(v)`` and the quotient (or the denominator) live together, in the moments'
    dtype (``element_size`` bytes): ``2 * element_size * numel``.

    8-bit state, chunk by chunk (:meth:`MomentStore.chunks`; a chunk of ``c`` elements decodes
    into float32 buffers of ``P`` elements, ``c`` rounded up to whole blocks, and nothing of it
    outlives it): the update holds both decoded moments and two float32 temporaries of the
    chunk (``sqrt(v)`` and the quotient): ``8P + 8c``. Re-encoding holds both moments, both
    keys' codes and scales, a zero-padded float32 copy where ``c < P`` and the kernel's float32
    copy of the 256-value map: ``10P (+4P) + 8 blocks + 1024`` (larger than the update only for
    chunks of under ~1000 elements).
    """
    if not stores_8bit(bits, numel, min_numel):
        return 2 * element_size * numel

    def chunk_peak(count: int) -> int:
        blocks = -(-count // BLOCK_SIZE)
        padded = blocks * BLOCK_SIZE
        pad_copy = 4 * padded if padded != count else 0
        encode = 10 * padded + pad_copy + 8 * blocks + 4 * 256  # + the kernel's copy of the map
        return max(8 * padded + 8 * count, encode)

    last = numel - (numel - 1) // CHUNK_NUMEL * CHUNK_NUMEL
    return max(chunk_peak(min(numel, CHUNK_NUMEL)), chunk_peak(last))
