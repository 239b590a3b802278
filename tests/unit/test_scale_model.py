"""The modelled 7B step of ``python -m benchmarks.scale_model`` (issue #23 item 5): the FSDP2 and
ZeRO-3 baselines' payloads against the weights' bytes, the overlap schedule's bounds, the model's
monotonicity in link speed, overlap never slower than none, the targets' verdicts, and every
printed table labelled MODELLED. Shapes only: no process group, no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from benchmarks import scale_model
from gnlorp_dist.bench.communication import DDP_ADAMW, OURS_LOW_RANK, shapes_from_config
from gnlorp_dist.bench.scale import Cluster, Workload, model_rows
from gnlorp_dist.bench.scale_baselines import (
    FSDP2_ADAMW,
    OURS_NEXT_FORWARD,
    SHARDED_BASELINES,
    ZERO3_ADAMW,
    Unit,
    layer_units,
    pipeline_seconds,
    sharded_payload,
)
from gnlorp_dist.bench.scale_sweep import SWEEP_GBPS, TARGETS, check_targets

SMALL = "llama_60m-4l"
SMALL_RANK = 128


def _tiny_plain() -> list:
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    return shapes_from_config(config, 4, weight_norm=False)


def test_sharded_payloads_are_three_times_the_weights() -> None:
    plain = _tiny_plain()
    weights = sum(t.numel for t in plain) * 2
    zero3 = sharded_payload(ZERO3_ADAMW, plain, 2, reuse=0)
    assert zero3["all_gather"] + zero3["reduce_scatter"] == 3 * weights
    assert zero3["reduce_scatter"] == weights
    # FSDP2 keeps its root (embedding, final norm, lm_head) gathered from forward to backward.
    embed, layers, head = layer_units(plain)
    assert embed == 100 * 16 and head == 100 * 16 + 16 and len(layers) == 3
    fsdp2 = sharded_payload(FSDP2_ADAMW, plain, 2, reuse=0)
    assert fsdp2["all_gather"] + fsdp2["reduce_scatter"] == 3 * weights - 2 * (embed + head)
    # ZeRO-3's reuse distance keeps the end of forward (head, then whole layers) gathered.
    kept = sharded_payload(ZERO3_ADAMW, plain, 2, reuse=head + layers[-1])
    assert kept["all_gather"] == 2 * weights - 2 * (head + layers[-1])
    with pytest.raises(ValueError, match="not sharded"):
        sharded_payload(DDP_ADAMW, plain, 2, reuse=0)


def test_pipeline_by_hand_and_its_bounds() -> None:
    assert pipeline_seconds([]) == 0.0
    # Fetch 1, compute 3, reduce 1 per unit: only the first fetch and the last reduce show.
    units = [Unit(fetch_s=1.0, compute_s=3.0, reduce_s=1.0)] * 4
    assert pipeline_seconds(units) == pytest.approx(1 + 4 * 3 + 1)
    # Link-bound: the link runs 4 x (2 + 2) seconds and the compute waits on it.
    units = [Unit(fetch_s=2.0, compute_s=1.0, reduce_s=2.0)] * 4
    wall = pipeline_seconds(units)
    assert 16.0 <= wall <= 16.0 + 4.0
    for units in (
        [Unit(fetch_s=0.5 * k, compute_s=1.0 + k, reduce_s=0.3) for k in range(5)],
        [Unit(compute_s=2.0, reduce_s=5.0), Unit(fetch_s=4.0, compute_s=0.1)],
    ):
        link = sum(u.fetch_s + u.reduce_s for u in units)
        compute = sum(u.compute_s for u in units)
        assert max(link, compute) <= pipeline_seconds(units) <= link + compute


@pytest.fixture(scope="module")
def sweep() -> list[tuple[float, list[dict]]]:
    workload = Workload(model=SMALL, rank=SMALL_RANK, gap=200, tokens_per_gpu=4096)
    return [(gbps, model_rows(Cluster(ib_gbits_per_s=gbps), workload)) for gbps in SWEEP_GBPS]


def test_rows_hold_the_sharded_baselines_and_next_forward(sweep) -> None:
    methods = [r["method"] for r in sweep[0][1]]
    for method in (*SHARDED_BASELINES, OURS_NEXT_FORWARD, DDP_ADAMW, OURS_LOW_RANK):
        assert methods.count(method) == 1
    assert "opt-in" in OURS_NEXT_FORWARD


def test_faster_links_never_slow_a_step(sweep) -> None:
    for (_, slow), (_, fast) in zip(sweep, sweep[1:]):
        for a, b in zip(slow, fast):
            assert a["method"] == b["method"]
            assert b["step_s_no_overlap"] <= a["step_s_no_overlap"] + 1e-12
            assert b["step_s_overlap"] <= a["step_s_overlap"] + 1e-12


def test_overlap_is_never_slower_than_none(sweep) -> None:
    for _, rows in sweep:
        by = {r["method"]: r for r in rows}
        for r in rows:
            assert r["step_s_overlap"] <= r["step_s_no_overlap"] + 1e-12, r["method"]
            assert r["step_s_overlap"] >= r["compute_s"], r["method"]
        assert by[OURS_NEXT_FORWARD]["step_s_overlap"] <= by[OURS_LOW_RANK]["step_s_overlap"]


def test_targets_say_where_we_lose(sweep) -> None:
    results = check_targets(sweep)
    # Two of ours per target; the slow-link target at every swept link at or below 25 Gb/s.
    slow = sum(1 for g, _ in sweep if g <= 25)
    assert len(results) == 2 * (len(TARGETS) - 1 + slow)
    for r in results:
        assert bool(r["why"]) == (not r["met"])


def test_command_prints_modelled_tables_and_targets(tmp_path: Path, capsys) -> None:
    out = tmp_path / "scale.json"
    argv = ["--model", SMALL, "--rank", str(SMALL_RANK), "--json", str(out)]
    assert scale_model.main(argv + ["--tokens-per-gpu", "4096", "16384"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    # Every table's title (the line above its header) says MODELLED.
    headers = [
        i for i, line in enumerate(lines) if line.startswith(("method ", "tokens/GPU", "Gb/s"))
    ]
    assert len(headers) == 2 + 1 + 2  # a table per setting, the summary, a sweep per setting
    for i in headers:
        assert "MODELLED" in lines[i - 1], lines[i - 1]
    for column in ("fsdp2-adamw s", "zero3-adamw s", "next-fwd s (opt-in)", "ours / fsdp2"):
        assert column in text
    assert OURS_NEXT_FORWARD in text
    assert text.count("Issue #23 targets") == 2
    assert all(f"\n{g:.0f} " in text for g in SWEEP_GBPS)
    record = json.loads(out.read_text())
    assert record["modelled"] is True
    assert [s["tokens_per_gpu"] for s in record["sweeps"]] == [4096, 16384]
    assert {t["target"] for t in record["sweeps"][0]["targets"]} == {t.name for t in TARGETS}
