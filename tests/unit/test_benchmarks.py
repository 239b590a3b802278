"""Smoke tests of the benchmark scripts: each main() in a tiny mode, its JSON, its invariants.

Speed and memory are benchmarks, not timed tests: nothing here asserts a duration. What is
asserted is the accounting (exact bytes against independent references) and the shape of the
results.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import optimizer_memory, step_time
from gnlorp_dist.bench import shape_bytes
from gnlorp_dist.bench.harness import format_table
from gnlorp_dist.bench.methods import make_optimizer, spec_hyper
from gnlorp_dist.models import build_model_on_meta, llama_config, model_spec
from gnlorp_dist.optim.projection import low_rank_shape, projection_side

HAS_GALORE_TORCH = True
try:
    import galore_torch  # noqa: F401
except ImportError:
    HAS_GALORE_TORCH = False


@pytest.fixture
def one_thread():
    """The scripts set torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def test_format_table_aligns_fixed_width_columns():
    table = format_table(["name", "bytes"], [["a", "1"], ["long name", "1,000"]])
    lines = table.splitlines()
    assert lines[0] == "name       bytes"
    assert lines[1] == "---------  -----"
    assert lines[2] == "a              1"
    assert lines[3] == "long name  1,000"


def test_state_bytes_count_moments_and_step_tensors_and_keep_projections_apart():
    weight = torch.nn.Parameter(torch.zeros(6, 4))
    weight.grad = torch.randn(6, 4)
    hp = spec_hyper(model_spec("llama_nano"))
    adamw = make_optimizer("adamw", [{"params": [weight]}], hp)
    adamw.step()
    # exp_avg + exp_avg_sq (fp32, 24 elements each) + the 4-byte step tensor.
    assert shape_bytes.state_and_projection_bytes(adamw, weight) == (2 * 24 * 4 + 4, 0)

    group = {
        "params": [weight],
        "rank": 2,
        "update_proj_gap": 10,
        "scale": 0.25,
        "proj_type": "std",
    }
    for method in ["galore"] + (["galore-torch"] if HAS_GALORE_TORCH else []):
        optimizer = make_optimizer(method, [dict(group)], hp)
        optimizer.step()
        # 6x4, rows >= cols: right projection, moments 6x2, projection matrix 2x4.
        counted = shape_bytes.state_and_projection_bytes(optimizer, weight)
        assert counted == (2 * 6 * 2 * 4, 2 * 4 * 4), method


def test_optimizer_memory_tiny_run_matches_references(tmp_path, one_thread):
    out = tmp_path / "memory.json"
    payload = optimizer_memory.main(
        ["--models", "llama_nano", "--layers", "1", "--workers", "1", "--json", str(out)]
        + ["--cross-check", "llama_nano", "--cross-check-layers", "1"]
        + one_thread
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    for key in ("versions", "cpu_count", "date_utc", "torch_threads"):
        assert key in payload["environment"]
    assert payload["environment"]["versions"]["torch"] == torch.__version__
    assert payload["settings"]["dtype"] == "bf16"
    result = payload["results"]["llama_nano"]
    methods = result["methods"]
    expected = ["adamw", "galore", "gradnormlorp"] + (["galore-torch"] if HAS_GALORE_TORCH else [])
    assert list(methods) == expected
    for r in methods.values():
        for key in shape_bytes.BYTE_KEYS + ("total_bytes", "state_ratio_to_adamw", "shapes"):
            assert key in r
        assert r["total_bytes"] == sum(r[k] for k in shape_bytes.BYTE_KEYS)
        assert r["state_ratio_to_adamw"] > 0

    config, spec = llama_config("llama_nano"), model_spec("llama_nano")
    config.num_hidden_layers = 1
    plain = sum(p.numel() for p in build_model_on_meta(config).parameters())
    bf16 = 2
    adamw = methods["adamw"]
    assert adamw["weight_bytes"] == adamw["gradient_bytes"] == plain * bf16
    # Two moments per element plus one 4-byte step tensor per parameter tensor.
    num_tensors = sum(s["count"] for s in adamw["shapes"])
    assert adamw["optimizer_state_bytes"] == 2 * plain * bf16 + 4 * num_tensors
    assert adamw["projection_bytes"] == 0

    # galore: low-rank moments for the 7 projected matrices, dense moments for the rest.
    hidden, inter, rank = config.hidden_size, config.intermediate_size, spec.rank
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    low = sum(math.prod(low_rank_shape(s, rank, projection_side(s, "std"))) for s in shapes)
    proj = sum(rank * min(s) for s in shapes)  # "std" keeps the smaller projection matrix
    dense = plain - sum(math.prod(s) for s in shapes)
    galore = methods["galore"]
    assert galore["optimizer_state_bytes"] == 2 * (low + dense) * bf16
    assert galore["projection_bytes"] == proj * bf16
    assert galore["num_projected_matrices"] == 7

    # gradnormlorp: the same, plus one magnitude per output row of each projected layer, dense.
    magnitudes = sum(s[0] for s in shapes)
    gnlorp = methods["gradnormlorp"]
    assert gnlorp["weight_bytes"] == (plain + magnitudes) * bf16
    assert (
        gnlorp["optimizer_state_bytes"] == galore["optimizer_state_bytes"] + 2 * magnitudes * bf16
    )
    assert gnlorp["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    assert gnlorp["state_ratio_to_adamw"] < 1
    if HAS_GALORE_TORCH:
        for key in shape_bytes.BYTE_KEYS:
            assert methods["galore-torch"][key] == galore[key], key
    # The whole-model step agreed with the per-shape totals (main() asserts it; it is recorded).
    assert set(result["cross_check"]["methods"]) == set(expected)


def test_step_time_quick_run_reports_ratios_and_refresh_costs(tmp_path, one_thread):
    out = tmp_path / "steps.json"
    methods = ["adamw", "galore", "gradnormlorp"] + (["galore-torch"] if HAS_GALORE_TORCH else [])
    payload = step_time.main(["--quick", "--methods", *methods, "--json", str(out)] + one_thread)
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert payload["environment"]["torch_threads"] == 1
    settings = payload["settings"]
    assert settings["model"] == "llama_nano" and settings["steps"] == step_time.QUICK["steps"]
    results = payload["methods"]
    assert list(results) == methods
    assert results["adamw"]["step_ratio_to_adamw"] == 1.0
    for method, r in results.items():
        assert r["step_s"]["n"] >= 1 and r["step_s"]["median"] > 0
        assert r["step_ratio_to_adamw"] > 0 and r["optimizer_step_ratio_to_adamw"] > 0
        if method == "adamw":
            assert "refresh_step_s" not in r
        else:
            assert r["refresh_step_s"]["n"] >= 1 and r["refresh_step_s"]["median"] > 0
            assert r["amortized_ratio_to_adamw"] > 0
    projection = payload["projection"]
    assert projection["num_matrices"] == 7 * llama_config("llama_nano").num_hidden_layers
    for method in ("svd", "randomized"):
        assert projection[method]["total_s"]["median"] > 0
    error = projection["randomized"]["subspace_error"]
    assert 0.0 <= error["mean"] <= error["max"] <= 1.0 + 1e-6
    kept = projection["randomized"]["energy_kept_vs_svd"]
    # The exact SVD basis keeps the most energy of any rank-r basis.
    assert 0.0 < kept["min"] <= kept["mean"] <= 1.0 + 1e-6


def test_step_time_rejects_a_run_where_no_timed_step_refreshes():
    with pytest.raises(ValueError, match="refresh-gap"):
        step_time.main(["--steps", "2", "--warmup", "1", "--refresh-gap", "5"])
