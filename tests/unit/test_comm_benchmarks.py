"""Shape arithmetic of the communication benchmark (:mod:`gnlorp_dist.bench.communication`) and
``benchmarks/scale_model.py``: payloads per step from parameter shapes against hand-computed
values, the ring and two-level collective formulas, the refresh-window average, the collective
counters' payload conventions (:mod:`gnlorp_dist.distributed.counting`); and the command line of
``python -m benchmarks.communication`` (every flag spelling, ``--quick``, ``--config``, the
computed-only record). No process group, no launch: the measured part of the benchmark is the
benchmark's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from benchmarks import scale_model as scale
from gnlorp_dist.bench.communication import measure, payloads, schemes, shapes, summary
from gnlorp_dist.bench.communication.config import CommunicationConfig
from gnlorp_dist.distributed import counting

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


def _shapes() -> tuple[list[shapes.TensorShape], list[shapes.TensorShape]]:
    config = _tiny()
    return (
        shapes.shapes_from_config(config, RANK, weight_norm=False),
        shapes.shapes_from_config(config, RANK, weight_norm=True),
    )


def test_shape_arithmetic_equals_the_real_model_and_groups() -> None:
    config = _tiny()
    for weight_norm in (False, True):
        by_hand = sorted(shapes.shapes_from_config(config, RANK, weight_norm), key=lambda t: t.name)
        real = sorted(shapes.shapes_from_model(config, RANK, weight_norm), key=lambda t: t.name)
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

    def payload(method: str, refresh: bool = False) -> payloads.Payload:
        return payloads.computed_payload(method, plain, normed, fp32, refresh)

    full_plain, full_normed = 6192 * fp32, 6352 * fp32
    assert payload(schemes.DDP_ADAMW) == payloads.payload(all_reduce=full_plain)
    # DeepSpeed adds one 4-byte scalar all-reduce per step.
    assert payload(schemes.ZERO2_ADAMW) == payloads.payload(
        all_reduce=full_plain + 4, all_gather=full_plain
    )
    assert payload(schemes.ZERO2_TEXTBOOK) == payloads.payload(
        reduce_scatter=full_plain, all_gather=full_plain, all_reduce=4
    )
    assert payload(schemes.OURS_DDP) == payloads.payload(
        all_reduce=full_normed + 40, broadcast=full_normed
    )
    assert payload(schemes.OURS_FULL) == payloads.payload(
        all_to_all=full_normed, broadcast=full_normed, all_reduce=40
    )
    # Low rank between refreshes: 4 x 64 + 2 x 160 + 160 = 736 low-rank elements, and the dense
    # 1600 + 1600 + 48 norms + 160 magnitudes = 3408, each reduced once and broadcast once.
    low, dense = 736, 3408
    assert payload(schemes.OURS_LOW_RANK) == payloads.payload(
        all_to_all=(low + dense) * fp32, broadcast=(low + dense) * fp32, all_reduce=40
    )
    # A refresh: full projected gradients (2944) reduced for the SVDs, bases (448) broadcast,
    # then the plain step's low-rank reduce and direction broadcast.
    assert payload(schemes.OURS_LOW_RANK, refresh=True) == payloads.payload(
        all_to_all=(2944 + low + dense) * fp32,
        broadcast=(448 + low + dense) * fp32 + 7 * 8,  # and 7 next refresh steps (float64)
        all_reduce=40,
    )


def test_bf16_weights_send_low_rank_traffic_in_bf16_and_bases_in_float32() -> None:
    # gnlorp_dist sends low-rank gradients, refresh gradients and directions in the weights'
    # dtype, bases in float32; dense rows in the gradient's. NARROW: the bases in bf16 too.
    plain, normed = _shapes()
    low, dense, bf16 = 736, 3408, 2
    implemented = payloads.computed_payload(schemes.OURS_LOW_RANK, plain, normed, bf16, False)
    narrow = payloads.computed_payload(schemes.OURS_LOW_RANK_NARROW, plain, normed, bf16, False)
    assert implemented["all_to_all"] == implemented["broadcast"] == (low + dense) * bf16
    assert narrow == implemented  # a plain step broadcasts no basis
    refresh = payloads.computed_payload(schemes.OURS_LOW_RANK, plain, normed, bf16, True)
    assert refresh["all_to_all"] == (2944 + low) * bf16 + dense * bf16
    assert refresh["broadcast"] == 448 * 4 + 7 * 8 + low * bf16 + dense * bf16
    # In fp32 the two are the same.
    assert payloads.computed_payload(
        schemes.OURS_LOW_RANK, plain, normed, 4, False
    ) == payloads.computed_payload(schemes.OURS_LOW_RANK_NARROW, plain, normed, 4, False)


def test_ring_factors_and_wire_bytes() -> None:
    for world in (2, 3, 4, 32):
        assert payloads.ring_factor("all_reduce", world) == pytest.approx(2 * (world - 1) / world)
        for op in ("reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all"):
            assert payloads.ring_factor(op, world) == pytest.approx((world - 1) / world)
    assert payloads.ring_factor("all_reduce", 1) == 0.0
    with pytest.raises(ValueError):
        payloads.ring_factor("gather", 4)
    # A reduce (or an all-to-all onto owners) plus a broadcast of S cost what one all-reduce
    # of S costs.
    s = 1000
    for summed in ("reduce", "all_to_all"):
        sent = payloads.payload(**{summed: s, "broadcast": s})
        assert payloads.ring_wire_bytes(sent, 4) == pytest.approx(
            payloads.ring_wire_bytes(payloads.payload(all_reduce=s), 4)
        )


def test_low_rank_ratio_by_hand_does_not_depend_on_world() -> None:
    plain, normed = _shapes()
    base = payloads.computed_payload(schemes.DDP_ADAMW, plain, normed, 4, False)
    ours = payloads.computed_payload(schemes.OURS_LOW_RANK, plain, normed, 4, False)
    expected = (2 * (736 + 3408) * 4 + 2 * 40) / (2 * 6192 * 4)
    for world in (2, 4, 32):
        ratio = payloads.ring_wire_bytes(ours, world) / payloads.ring_wire_bytes(base, world)
        assert ratio == pytest.approx(expected)


def test_window_average() -> None:
    plain = payloads.payload(reduce=10, broadcast=10)
    refresh = payloads.payload(reduce=100, broadcast=30)
    avg = payloads.window_average(plain, refresh, 10)
    assert avg["reduce"] == pytest.approx((100 + 9 * 10) / 10)
    assert avg["broadcast"] == pytest.approx((30 + 9 * 10) / 10)
    assert avg["all_reduce"] == 0


def test_7b_compressed_ratio_meets_the_issue() -> None:
    # Shapes by arithmetic (no model): LLaMA 7B, rank 1024, one refresh every 200 steps, bf16.
    config = schemes.model_config("llama_7b")
    plain = shapes.shapes_from_config(config, 1024, weight_norm=False)
    normed = shapes.shapes_from_config(config, 1024, weight_norm=True)
    base = payloads.computed_payload(schemes.DDP_ADAMW, plain, normed, 2, False)

    def ratio(method: str) -> float:
        p = payloads.computed_payload(method, plain, normed, 2, False)
        r = payloads.computed_payload(method, plain, normed, 2, True)
        avg = payloads.window_average(p, r, 200)
        return payloads.ring_wire_bytes(avg, 32) / payloads.ring_wire_bytes(base, 32)  # type: ignore[arg-type]

    # The bf16 low-rank traffic gnlorp_dist sends meets the issue's target; float32 bases
    # (broadcast once per refresh) cost 0.001 of it.
    assert ratio(schemes.OURS_LOW_RANK_NARROW) == pytest.approx(0.282, abs=0.001)
    assert ratio(schemes.OURS_LOW_RANK) == pytest.approx(0.283, abs=0.001)
    assert ratio(schemes.OURS_LOW_RANK) <= schemes.ISSUE_TARGET
    # Every projected 7B matrix keeps r / min(M, N) = 1024 / 4096 of its gradient.
    projected = [t for t in normed if t.rank is not None]
    assert sum(t.low_rank_numel for t in projected) * 4 == sum(t.numel for t in projected)


def test_dense_breakdown() -> None:
    _, normed = _shapes()
    assert payloads.dense_breakdown(normed, 4) == {
        "embed_tokens": 1600 * 4,
        "lm_head": 1600 * 4,
        "magnitudes": 160 * 4,
        "norms": 48 * 4,
    }


def test_counter_payload_conventions() -> None:
    x = torch.zeros(10)
    out = torch.zeros(40)
    sizes = {name: size for name, (_, size) in counting.PAYLOAD_OF_CALL.items()}
    assert sizes["all_reduce"]((x,), {}) == 40
    assert sizes["broadcast"]((), {"tensor": x, "src": 0}) == 40
    assert sizes["all_gather_into_tensor"]((out, x), {}) == 160  # the gathered output
    assert sizes["reduce_scatter_tensor"]((x, out), {}) == 160  # the input
    assert sizes["all_gather"](([x, x, x, x], x), {}) == 160
    assert sizes["reduce_scatter"]((x, [x, x]), {}) == 80


def test_loopback_counter_reads() -> None:
    if not Path("/proc/net/dev").exists():
        pytest.skip("no /proc/net/dev")
    assert measure.loopback_tx_bytes() >= 0


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
    payload = {op: 0.0 for op in schemes.OPS}
    row = scale.step_model(schemes.DDP_ADAMW, payload, cluster, workload, 10**9, [], 1)
    assert row["compute_s"] == pytest.approx(6 * 1e9 * 1000 / 50e12)
    assert row["backward_s"] == pytest.approx(row["compute_s"] * 4 / 6)
    assert row["step_s_no_overlap"] == pytest.approx(row["compute_s"])


def _record(step: int, lo: int, refreshes: int, dist_payload: dict[str, int]) -> dict:
    payload = payloads.payload(**dist_payload)
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
    settings = measure.RunSettings(model="llama_60m", method=schemes.OURS_FULL, world=2)
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
    row = summary.summarise_run(settings, ranks)
    assert [s["refresh"] for s in row["steps"]] == [False, True, False]
    assert row["plain"]["lo_bytes_net"] == 2000  # the smallest plain step, barriers off
    assert row["refresh"]["lo_bytes_net"] == 5000
    assert all(s["counters_agree"] for s in row["steps"])
    base = dict(row, method=schemes.DDP_ADAMW)
    base["plain"] = dict(row["plain"], lo_bytes_net=4000)
    base["refresh"] = None
    rows = [base, row]
    summary.add_measured_ratios(rows, {2: {"reduce": 2.0, "broadcast": 1.0, "all_reduce": 2.0}})
    assert row["lo_avg"] == pytest.approx((5000 + 199 * 2000) / 200)
    assert row["lo_plain_x_ddp"] == pytest.approx(0.5)
    assert row["lo_expected_plain"] == pytest.approx(2.0 * 1000 + 1.0 * 1000 + 2.0 * 40)
    assert base["lo_avg"] == base["lo_plain"] == 4000  # no refresh measured: every step plain


# -- the command line (benchmarks/communication.py over gnlorp_dist.options.parser) ---------------


def test_every_flag_spelling_of_the_documented_commands_parses() -> None:
    from benchmarks.communication import parse_config

    config = parse_config(
        "--private-netns --dtype bf16 --models llama_nano llama_60m-4l --worlds 2 "
        "--methods ddp-adamw ours-ddp ours-lowrank --json out.json --batch 2 --seq 16 "
        "--warmup 3 --steps 4 --run-gap 5 --timeout 30 --computed-world 8".split()
    )
    assert config == CommunicationConfig(
        private_netns=True,
        dtype="bf16",
        models=("llama_nano", "llama_60m-4l"),
        worlds=(2,),
        methods=("ddp-adamw", "ours-ddp", "ours-lowrank"),
        json="out.json",
        batch=2,
        seq=16,
        warmup=3,
        steps=4,
        run_gap=5,
        timeout=30.0,
        computed_world=8,
    )
    defaults = parse_config([])
    assert defaults == CommunicationConfig()
    assert (defaults.models, defaults.worlds, defaults.methods) == (
        schemes.MEASURED_MODELS,
        (2, 4),
        schemes.SCHEMES,
    )
    assert defaults.json == "benchmarks/results/communication.json"
    assert parse_config(["--computed-only"]).computed_only


def test_quick_sets_the_window_and_a_window_measuring_nothing_is_a_usage_error() -> None:
    from benchmarks.communication import parse_config

    quick = parse_config(["--quick", "--steps", "9"])
    assert (quick.warmup, quick.steps, quick.run_gap) == (1, 2, 2)  # --quick wins, as before
    assert not quick.refresh_may_miss()
    assert parse_config(["--run-gap", "9"]).refresh_may_miss()
    for bad in (["--steps", "0"], ["--warmup", "-1"], ["--run-gap", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(bad)
        assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="--run-gap 1: use"):
        CommunicationConfig(run_gap=1).measured_window()
    with pytest.raises(SystemExit):
        parse_config(["--models", "llama_70b"])  # not a known shape


def test_a_config_file_gives_options_and_flags_override_it(tmp_path: Path) -> None:
    from benchmarks.communication import parse_config

    file = tmp_path / "comm.yaml"
    file.write_text("models: [llama_nano]\nworlds: 2\ncomputed-world: 4\ndtype: bf16\n")
    config = parse_config(["--config", str(file), "--worlds", "2", "4"])
    assert (config.models, config.worlds, config.computed_world, config.dtype) == (
        ("llama_nano",),
        (2, 4),
        4,
        "bf16",
    )
    file.write_text("models: [llama_nano, llama_70b]\n")  # every listed value is checked
    with pytest.raises(SystemExit):
        parse_config(["--config", str(file)])
    settings = config.run_settings("llama_nano", schemes.OURS_FULL, 2)
    assert settings == measure.RunSettings(
        model="llama_nano", method=schemes.OURS_FULL, world=2, dtype="bf16", timeout_s=600.0
    )


def test_computed_only_prints_the_tables_and_writes_the_record(tmp_path: Path, capsys) -> None:
    from benchmarks.communication import main

    out = tmp_path / "communication.json"
    assert (
        main(["--computed-only", "--models", "llama_nano", "--worlds", "2", "--json", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "llama_nano: fp32, N = 2" in text and "llama_1b, llama_7b: bf16" in text
    assert "7B ours-lowrank / (DDP + AdamW), as gnlorp_dist sends it" in text
    assert "0.283 averaged over T = 200" in text  # benchmarks/README.md quotes it
    record = json.loads(out.read_text())
    assert list(record) == [
        "benchmark",
        "environment",
        "computed",
        "issue_7b",
        "issue_23_7b_targets",
    ]
    assert [(r["model"], r["world"]) for r in record["computed"][:1]] == [("llama_nano", 2)]
    assert len(record["computed"]) == 3 * len(schemes.COMPUTED_SCHEMES)
    assert record["issue_7b"][schemes.OURS_LOW_RANK]["meets_target"] is True


def test_touched_rows_shrink_the_summed_payload_by_the_untouched_rows() -> None:
    from gnlorp_dist.bench.communication.payloads import with_touched_rows  # noqa: PLC0415

    vocab, row_bytes = 1000, 64
    computed = payloads.payload(all_to_all=10 * vocab * row_bytes, broadcast=5, all_reduce=40)
    sparse = with_touched_rows(computed, schemes.OURS_LOW_RANK, vocab * row_bytes, vocab, 30, 2)
    assert sparse["all_to_all"] == computed["all_to_all"] - (vocab - 30) * row_bytes
    assert sparse["all_reduce"] == 40 + vocab  # the one-byte-per-row mask
    assert sparse["broadcast"] == 5
    # Nearly every row touched: the optimizer sends the whole table (the rule does not pay).
    dense = with_touched_rows(computed, schemes.OURS_LOW_RANK, vocab * row_bytes, vocab, 990, 2)
    assert dense == computed
    # DDP and unknown counts: unchanged.
    assert with_touched_rows(computed, schemes.DDP_ADAMW, vocab * row_bytes, vocab, 30, 2) == (
        computed
    )
    assert with_touched_rows(computed, schemes.OURS_FULL, vocab * row_bytes, vocab, None, 2) == (
        computed
    )


def test_seven_b_targets_agree_with_the_computed_7b_row() -> None:
    from gnlorp_dist.bench.communication import seven_b  # noqa: PLC0415

    assert seven_b.expected_touched_rows(32000, 524_288) == 32000
    assert seven_b.expected_touched_rows(100, 1) == 1
    rows, text = seven_b.seven_b_targets(32)
    big = payloads.computed_rows(["llama_7b"], 32, 2, "bf16")
    as_sent = next(r for r in big if r["method"] == schemes.OURS_LOW_RANK)
    first = rows[0]
    assert first["rank"] == 1024 and first["variant"].startswith("as sent")
    assert first["times_fewer"] == pytest.approx(1 / as_sent["ratio_avg"])
    # A projected lm_head only removes bytes; r = 256 sends fewer than r = 1024.
    by = {(r["rank"], r["variant"][:6]): r["ours_mib"] for r in rows}
    assert by[1024, "+ proj"] < by[1024, "as sen"]
    assert by[256, "as sen"] < by[1024, "as sen"]
    assert "MODELLED" in text
