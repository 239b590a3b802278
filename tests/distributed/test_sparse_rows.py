"""The embedding's touched rows alone give the full reduction's weights, on 2 and 3 gloo ranks.

One launch per world size runs every scenario twice, with the sparse-row reduce
(:mod:`gnlorp_dist.optim.sparse_rows`) and with it switched off (the full reduce of every row):
the low-rank reduction started inside backward and the full reduction, fp32 and 8-bit moments,
and per-layer updates with 2 accumulated micro-batches. The batches draw tokens below
:data:`TOKENS` of a :data:`VOCAB` vocabulary, so some row blocks of the split embedding hold no
touched row at all; ``lm_head``'s gradient is dense and is found so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gnlorp_dist import (
    GradNormLoRPAdamW,
    PerLayerUpdates,
    apply_weight_norm,
    projected_param_groups,
)
from gnlorp_dist.optim import sparse_rows

from .harness import flat_parameters, run_ranks

VOCAB, HIDDEN, TOKENS = 4096, 16, 1000  # 4096 x 16 = SPLIT_MIN_NUMEL: split in row blocks
STEPS, GAP, MICRO = 6, 3, 2
SCENARIOS = {
    "low_rank": {"gradient_reduction": "low_rank"},
    "low_rank-8bit": {"gradient_reduction": "low_rank", "bits": 8, "min_8bit_size": 64},
    "full": {"gradient_reduction": "full"},
    "full-8bit": {"gradient_reduction": "full", "bits": 8, "min_8bit_size": 64},
    "per_layer-low_rank": {"gradient_reduction": "low_rank"},
    "per_layer-full-8bit": {"gradient_reduction": "full", "bits": 8, "min_8bit_size": 64},
}


def _model() -> LlamaForCausalLM:
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
    )
    return apply_weight_norm(LlamaForCausalLM(config))


def _ids(step: int, rank: int, micro: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randint(0, TOKENS, (2, 8), generator=gen)


def _train(name: str, rank: int, comm) -> dict:
    """One scenario on this rank: its weights, the bytes each collective kind moved, and
    whether the embedding and ``lm_head`` were found dense."""
    model = _model()  # the same seed on every rank: the same initial weights
    options = SCENARIOS[name]
    groups = projected_param_groups(model, rank=4, update_proj_gap=GAP, scale=0.25)
    optimizer = GradNormLoRPAdamW(groups, lr=1e-2, weight_decay=0.01, communicator=comm, **options)
    if name.startswith("per_layer"):
        with PerLayerUpdates(optimizer, accumulation_steps=MICRO):
            for step in range(STEPS):
                for micro in range(MICRO):
                    ids = _ids(step, rank, micro)
                    (model(input_ids=ids, labels=ids).loss / MICRO).backward()
    else:
        for step in range(STEPS):
            ids = _ids(step, rank, 0)
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            with optimizer.reducing_in_backward():
                loss.backward()
            optimizer.step()
    return {
        "weights": flat_parameters(model),
        "bytes": dict(comm.snapshot()),
        "dense": [
            sparse_rows.found_dense(model.model.embed_tokens.weight),
            sparse_rows.found_dense(model.lm_head.weight),
        ],
    }


def _ranks(rank: int, world_size: int, out_dir: str) -> None:
    from gnlorp_dist.distributed.counting import CountingCommunicator  # noqa: PLC0415

    results = {}
    rows_per_column = sparse_rows.TABLE_ROWS_PER_COLUMN
    for name in SCENARIOS:
        results[name, "sparse"] = _train(name, rank, CountingCommunicator())
        sparse_rows.TABLE_ROWS_PER_COLUMN = 10**9  # no table: every row is reduced
        try:
            results[name, "full"] = _train(name, rank, CountingCommunicator())
        finally:
            sparse_rows.TABLE_ROWS_PER_COLUMN = rows_per_column
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 3])
def runs(request, tmp_path_factory):
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"sparse_rows_{world_size}")
    run_ranks(world_size, _ranks, str(out_dir))
    return world_size, [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _weights(result: dict) -> torch.Tensor:
    return result["weights"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_touched_rows_give_the_full_reductions_weights(runs, name):
    world_size, results = runs
    for rank in range(world_size):
        sparse, full = results[rank][name, "sparse"], results[rank][name, "full"]
        if world_size == 2:  # a + b in either buffer
            assert torch.equal(_weights(sparse), _weights(full)), rank
        else:  # the backend may add three ranks in another order for another buffer length
            assert _rel(_weights(sparse), _weights(full)) < 1e-6, rank
        assert torch.equal(_weights(sparse), _weights(results[0][name, "sparse"]))
        # The embedding's touched rows went alone; lm_head's gradient is dense, found so.
        assert sparse["dense"] == [False, True], sparse["dense"]
        assert full["dense"] == [False, False]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_touched_rows_move_fewer_bytes(runs, name):
    """Rank 0's reduces shrink by most of the embedding (at most 16 x STEPS x MICRO rows of
    VOCAB per rank are touched), at the price of one byte per row and step in all-reduces."""
    world_size, results = runs
    sparse, full = results[0][name, "sparse"]["bytes"], results[0][name, "full"]["bytes"]
    embedding = VOCAB * HIDDEN * 4
    touched_bound = world_size * 16 * MICRO * HIDDEN * 4
    saved = full["all_to_all"] - sparse["all_to_all"]
    assert saved >= STEPS * (embedding - touched_bound), (sparse, full)
    # The masks: the embedding's every step, lm_head's once (then it is known dense).
    assert sparse["all_reduce"] - full["all_reduce"] == (STEPS + 1) * VOCAB
    assert sparse["broadcast"] == full["broadcast"]
