"""Shape arithmetic of ``benchmarks/communication.py`` and ``benchmarks/scale_model.py``: payloads
per step from parameter shapes against hand-computed values, the ring and two-level collective
formulas, the refresh-window average, the collective counters' payload conventions. No process
group, no launch: the measured part of the benchmark is the benchmark's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from benchmarks import communication as comm
from benchmarks import scale_model as scale

# One layer, hidden 16, intermediate 40, vocab 100, rank 4: small enough to count by hand.
TINY = dict(
    vocab_size=100,
    hidden_size=16,
    intermediate_size=40,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
RANK = 4


def _tiny() -> LlamaConfig:
    return LlamaConfig(**TINY)


def _shapes() -> tuple[list[comm.TensorShape], list[comm.TensorShape]]:
    config = _tiny()
    return (
        comm.shapes_from_config(config, RANK, weight_norm=False),
        comm.shapes_from_config(config, RANK, weight_norm=True),
    )


def test_shape_arithmetic_equals_the_real_model_and_groups() -> None:
    config = _tiny()
    for weight_norm in (False, True):
        by_hand = sorted(comm.shapes_from_config(config, RANK, weight_norm), key=lambda t: t.name)
        real = sorted(comm.shapes_from_model(config, RANK, weight_norm), key=lambda t: t.name)
        assert by_hand == real


def test_tiny_counts_by_hand() -> None:
    plain, normed = _shapes()
    # embed + lm_head 2 x 1600, q k v o 4 x 256, gate up 2 x 640, down 640, 3 norms x 16.
    assert sum(t.numel for t in plain) == 6192
    # + one magnitude per output row: q k v o 4 x 16, gate up 2 x 40, down 16.
    assert sum(t.numel for t in normed) == 6192 + 160
    projected = {t.name.split(".")[-2]: t for t in normed if t.rank is not None}
    # std rule: rows >= cols projects on the right (M x r), else on the left (r x N).
    assert projected["q_proj"].low_rank_numel == 16 * 4
    assert projected["gate_proj"].low_rank_numel == 40 * 4
    assert projected["down_proj"].low_rank_numel == 4 * 40
    assert projected["q_proj"].basis_numel == 4 * 16
    assert projected["gate_proj"].basis_numel == 4 * 16
    assert projected["down_proj"].basis_numel == 16 * 4


def test_computed_payloads_by_hand() -> None:
    plain, normed = _shapes()
    fp32 = 4

    def payload(method: str, refresh: bool = False) -> comm.Payload:
        return comm.computed_payload(method, plain, normed, fp32, refresh)

    full_plain, full_normed = 6192 * fp32, 6352 * fp32
    assert payload(comm.DDP_ADAMW) == comm._payload(all_reduce=full_plain)
    # DeepSpeed adds one 4-byte scalar all-reduce per step.
    assert payload(comm.ZERO2_ADAMW) == comm._payload(
        all_reduce=full_plain + 4, all_gather=full_plain
    )
    assert payload(comm.ZERO2_TEXTBOOK) == comm._payload(
        reduce_scatter=full_plain, all_gather=full_plain, all_reduce=4
    )
    assert payload(comm.OURS_DDP) == comm._payload(
        all_reduce=full_normed + 40, broadcast=full_normed
    )
    assert payload(comm.OURS_FULL) == comm._payload(
        reduce=full_normed, broadcast=full_normed, all_reduce=40
    )
    # Low rank between refreshes: 4 x 64 + 2 x 160 + 160 = 736 low-rank elements, and the dense
    # 1600 + 1600 + 48 norms + 160 magnitudes = 3408, each reduced once and broadcast once.
    low, dense = 736, 3408
    assert payload(comm.OURS_LOW_RANK) == comm._payload(
        reduce=(low + dense) * fp32, broadcast=(low + dense) * fp32, all_reduce=40
    )
    # A refresh: full projected gradients (2944) reduced for the SVDs, bases (448) broadcast,
    # then the plain step's low-rank reduce and direction broadcast.
    assert payload(comm.OURS_LOW_RANK, refresh=True) == comm._payload(
        reduce=(2944 + low + dense) * fp32, broadcast=(448 + low + dense) * fp32, all_reduce=40
    )


def test_bf16_weights_send_low_rank_traffic_in_bf16_and_bases_in_float32() -> None:
    # gnlorp_dist sends low-rank gradients, refresh gradients and directions in the weights'
    # dtype, bases in float32; dense rows in the gradient's. NARROW: the bases in bf16 too.
    plain, normed = _shapes()
    low, dense, bf16 = 736, 3408, 2
    implemented = comm.computed_payload(comm.OURS_LOW_RANK, plain, normed, bf16, False)
    narrow = comm.computed_payload(comm.OURS_LOW_RANK_NARROW, plain, normed, bf16, False)
    assert implemented["reduce"] == implemented["broadcast"] == (low + dense) * bf16
    assert narrow == implemented  # a plain step broadcasts no basis
    refresh = comm.computed_payload(comm.OURS_LOW_RANK, plain, normed, bf16, True)
    assert refresh["reduce"] == (2944 + low) * bf16 + dense * bf16
    assert refresh["broadcast"] == 448 * 4 + low * bf16 + dense * bf16
    # In fp32 the two are the same.
    assert comm.computed_payload(
        comm.OURS_LOW_RANK, plain, normed, 4, False
    ) == comm.computed_payload(comm.OURS_LOW_RANK_NARROW, plain, normed, 4, False)


def test_ring_factors_and_wire_bytes() -> None:
    for world in (2, 3, 4, 32):
        assert comm.ring_factor("all_reduce", world) == pytest.approx(2 * (world - 1) / world)
        for op in ("reduce", "broadcast", "all_gather", "reduce_scatter"):
            assert comm.ring_factor(op, world) == pytest.approx((world - 1) / world)
    assert comm.ring_factor("all_reduce", 1) == 0.0
    with pytest.raises(ValueError):
        comm.ring_factor("all_to_all", 4)
    # A reduce plus a broadcast of S cost what one all-reduce of S costs.
    s = 1000
    assert comm.ring_wire_bytes(comm._payload(reduce=s, broadcast=s), 4) == pytest.approx(
        comm.ring_wire_bytes(comm._payload(all_reduce=s), 4)
    )


def test_low_rank_ratio_by_hand_does_not_depend_on_world() -> None:
    plain, normed = _shapes()
    base = comm.computed_payload(comm.DDP_ADAMW, plain, normed, 4, False)
    ours = comm.computed_payload(comm.OURS_LOW_RANK, plain, normed, 4, False)
    expected = (2 * (736 + 3408) * 4 + 2 * 40) / (2 * 6192 * 4)
    for world in (2, 4, 32):
        ratio = comm.ring_wire_bytes(ours, world) / comm.ring_wire_bytes(base, world)
        assert ratio == pytest.approx(expected)


def test_window_average() -> None:
    plain = comm._payload(reduce=10, broadcast=10)
    refresh = comm._payload(reduce=100, broadcast=30)
    avg = comm.window_average(plain, refresh, 10)
    assert avg["reduce"] == pytest.approx((100 + 9 * 10) / 10)
    assert avg["broadcast"] == pytest.approx((30 + 9 * 10) / 10)
    assert avg["all_reduce"] == 0


def test_7b_compressed_ratio_meets_the_issue() -> None:
    # Shapes by arithmetic (no model): LLaMA 7B, rank 1024, one refresh every 200 steps, bf16.
    config = comm.model_config("llama_7b")
    plain = comm.shapes_from_config(config, 1024, weight_norm=False)
    normed = comm.shapes_from_config(config, 1024, weight_norm=True)
    base = comm.computed_payload(comm.DDP_ADAMW, plain, normed, 2, False)

    def ratio(method: str) -> float:
        p = comm.computed_payload(method, plain, normed, 2, False)
        r = comm.computed_payload(method, plain, normed, 2, True)
        avg = comm.window_average(p, r, 200)
        return comm.ring_wire_bytes(avg, 32) / comm.ring_wire_bytes(base, 32)  # type: ignore[arg-type]

    # The bf16 low-rank traffic gnlorp_dist sends meets the issue's target; float32 bases
    # (broadcast once per refresh) cost 0.001 of it.
    assert ratio(comm.OURS_LOW_RANK_NARROW) == pytest.approx(0.282, abs=0.001)
    assert ratio(comm.OURS_LOW_RANK) == pytest.approx(0.283, abs=0.001)
    assert ratio(comm.OURS_LOW_RANK) <= comm.ISSUE_TARGET
    # Every projected 7B matrix keeps r / min(M, N) = 1024 / 4096 of its gradient.
    projected = [t for t in normed if t.rank is not None]
    assert sum(t.low_rank_numel for t in projected) * 4 == sum(t.numel for t in projected)


def test_dense_breakdown() -> None:
    _, normed = _shapes()
    assert comm.dense_breakdown(normed, 4) == {
        "embed_tokens": 1600 * 4,
        "lm_head": 1600 * 4,
        "magnitudes": 160 * 4,
        "norms": 48 * 4,
    }


def test_counter_payload_conventions() -> None:
    x = torch.zeros(10)
    out = torch.zeros(40)
    sizes = {name: size for name, (_, size) in comm._DIST_FUNCTIONS.items()}
    assert sizes["all_reduce"]((x,), {}) == 40
    assert sizes["broadcast"]((), {"tensor": x, "src": 0}) == 40
    assert sizes["all_gather_into_tensor"]((out, x), {}) == 160  # the gathered output
    assert sizes["reduce_scatter_tensor"]((x, out), {}) == 160  # the input
    assert sizes["all_gather"](([x, x, x, x], x), {}) == 160
    assert sizes["reduce_scatter"]((x, [x, x]), {}) == 80


def test_loopback_counter_reads() -> None:
    if not Path("/proc/net/dev").exists():
        pytest.skip("no /proc/net/dev")
    assert comm.loopback_tx_bytes() >= 0


def test_two_level_collective_time_by_hand() -> None:
    cluster = scale.Cluster(nodes=8, gpus_per_node=4, link_efficiency=0.5)
    s = 1e9
    nvlink, network = 300e9, 200e9 / 8
    all_reduce = (2 * 3 / 4 * s / nvlink + 2 * 7 / 8 * s / network) / 0.5
    assert scale.collective_seconds("all_reduce", s, cluster) == pytest.approx(all_reduce)
    for op in ("reduce", "broadcast", "all_gather", "reduce_scatter"):
        assert scale.collective_seconds(op, s, cluster) == pytest.approx(all_reduce / 2)
    assert scale.collective_seconds("all_reduce", 0, cluster) == 0.0


def test_compute_time_is_six_params_tokens() -> None:
    cluster = scale.Cluster(peak_tflops=100.0, mfu=0.5)
    workload = scale.Workload(tokens_per_gpu=1000)
    payload = {op: 0.0 for op in comm.OPS}
    row = scale.step_model(comm.DDP_ADAMW, payload, cluster, workload, 10**9, [], 1)
    assert row["compute_s"] == pytest.approx(6 * 1e9 * 1000 / 50e12)
    assert row["backward_s"] == pytest.approx(row["compute_s"] * 4 / 6)
    assert row["step_s_no_overlap"] == pytest.approx(row["compute_s"])


def _record(step: int, lo: int, refreshes: int, dist_payload: dict[str, int]) -> dict:
    payload = comm._payload(**dist_payload)
    return {
        "step": step,
        "lo_bytes": lo,
        "dist": payload,
        "comm": payload,
        "hook": {"all_reduce": 0, "buckets": 0},
        "refreshes": refreshes,
        "loss": 1.0,
    }


def test_summarise_splits_plain_and_refresh_steps_and_averages_at_the_gap() -> None:
    # Two ranks of ours-full on llama_60m (T = 200): a refresh at step 3 (rank 1 owns every
    # matrix), barriers costing 100 B per window; the loopback figures are made up.
    barrier = 100
    settings = comm.RunSettings(model="llama_60m", method=comm.OURS_FULL, world=2)
    payload = {"reduce": 1000, "broadcast": 1000, "all_reduce": 40}
    ranks = [
        {
            "empty_windows_lo": [barrier, barrier + 5],
            "records": [
                _record(2, 2100 + barrier, 0, payload),
                _record(3, 5000 + barrier, refreshes, payload),
                _record(4, 2000 + barrier, 0, payload),
            ],
        }
        for refreshes in (0, 3)
    ]
    row = comm.summarise_run(settings, ranks)
    assert [s["refresh"] for s in row["steps"]] == [False, True, False]
    assert row["plain"]["lo_bytes_net"] == 2000  # the smallest plain step, barriers off
    assert row["refresh"]["lo_bytes_net"] == 5000
    assert all(s["counters_agree"] for s in row["steps"])
    base = dict(row, method=comm.DDP_ADAMW)
    base["plain"] = dict(row["plain"], lo_bytes_net=4000)
    base["refresh"] = None
    rows = [base, row]
    comm.add_measured_ratios(rows, {2: {"reduce": 2.0, "broadcast": 1.0, "all_reduce": 2.0}})
    assert row["lo_avg"] == pytest.approx((5000 + 199 * 2000) / 200)
    assert row["lo_plain_x_ddp"] == pytest.approx(0.5)
    assert row["lo_expected_plain"] == pytest.approx(2.0 * 1000 + 1.0 * 1000 + 2.0 * 40)
    assert base["lo_avg"] == base["lo_plain"] == 4000  # no refresh measured: every step plain
