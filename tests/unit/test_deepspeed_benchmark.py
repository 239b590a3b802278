"""benchmarks/deepspeed_zero.py's core (:mod:`gnlorp_dist.bench.zero`, :mod:`~gnlorp_dist.bench.
zero_report`), in this process at world size 1 on a tiny LLaMA.

The byte counts the benchmark reports are compared with counts made here independently: our
optimizer stepped once without DeepSpeed, and the model's element count for DeepSpeed's fp32
masters and AdamW moments. Nothing asserts a duration or a pasted number.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig

pytest.importorskip("deepspeed")

from benchmarks import deepspeed_zero as script  # noqa: E402
from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups  # noqa: E402
from gnlorp_dist.bench import zero as bench  # noqa: E402
from gnlorp_dist.bench import zero_report as report_of  # noqa: E402
from gnlorp_dist.models import build_model, recipe_for_config  # noqa: E402

CASES = [
    bench.Case(bench.OURS, 0),
    bench.Case(bench.OURS, 2),
    bench.Case(bench.OURS, 3),
    bench.Case(bench.OURS_8BIT, 1),
    bench.Case(bench.DEEPSPEED_ADAMW, 0),
    bench.Case(bench.DEEPSPEED_ADAMW, 2),
    bench.Case(bench.DEEPSPEED_ADAMW, 3),
]
ENGINE_OPTIMIZER = {0: None, 1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer"}
ENGINE_OPTIMIZER[3] = "DeepSpeedZeroOptimizer_Stage3"


def _tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=None,
    )


@pytest.fixture(scope="module")
def report():
    env_before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    settings = bench.RunSettings(config=_tiny_config(), steps=2, batch=2, seq=16)
    results = bench.launch(CASES, settings, world_size=1, in_process=True)
    env_after = {k: os.environ.get(k) for k in env_before}
    rows = [report_of.summarise([r]) for r in results[0]]
    report_of.add_ratios(rows)
    return {
        "settings": settings,
        "results": results,
        "rows": rows,
        "env": (env_before, env_after),
        "dist_left_initialised": torch.distributed.is_initialized(),
    }


def _independent_state_bytes(bits: int) -> tuple[int, int, int]:
    """(state bytes, proj bytes, projected matrices) of our optimizer after one plain step."""
    config = _tiny_config()
    model = apply_weight_norm(build_model(config))
    spec = recipe_for_config(config)
    groups = projected_param_groups(
        model, rank=spec.rank, update_proj_gap=spec.update_proj_gap, scale=spec.scale
    )
    optimizer = GradNormLoRPAdamW(groups, bits=bits)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    state = proj = 0
    for param_state in optimizer.state.values():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                state += value.numel() * value.element_size()
                proj += value.numel() * value.element_size() if key == "proj" else 0
    projected = sum(len(g["params"]) for g in groups if "rank" in g)
    return state, proj, projected


def _numel(weight_norm: bool) -> int:
    model = build_model(_tiny_config())
    if weight_norm:
        apply_weight_norm(model)
    return sum(p.numel() for p in model.parameters())


def test_one_row_per_case_with_the_reported_fields(report):
    rows = report["rows"]
    assert [(r["optimizer"], r["stage"]) for r in rows] == [(c.optimizer, c.stage) for c in CASES]
    for row in rows:
        assert row["world_size"] == 1
        assert len(row["state_bytes_per_rank"]) == len(row["master_bytes_per_rank"]) == 1
        assert row["state_bytes_max"] == row["state_bytes_min"] > 0
        assert row["state_max_over_1rank"] == 1.0
        assert len(row["losses_rank0"]) == 2
        assert all(torch.isfinite(torch.tensor(row["losses_rank0"])))
        assert row["tokens_per_s"] > 0
        assert row["peak_bytes_per_rank"] == [None]  # CPU: no CUDA allocator to ask
    table = report_of.zero_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert "state B/rank max" in table[0]


def test_torch_distributed_and_the_environment_are_left_as_found(report):
    assert not report["dist_left_initialised"]
    before, after = report["env"]
    assert before == after


@pytest.mark.parametrize("optimizer", [bench.OURS, bench.OURS_8BIT])
def test_our_state_bytes_equal_one_plain_step_of_the_same_optimizer(report, optimizer):
    state, proj, projected = _independent_state_bytes(8 if optimizer == bench.OURS_8BIT else 32)
    rows = [r for r in report["rows"] if r["optimizer"] == optimizer]
    assert rows
    for row in rows:
        assert row["state_bytes_max"] == state, row["stage"]
        assert row["proj_bytes_per_rank"] == [proj], row["stage"]
        # World size 1: this rank owns every matrix and computes every SVD of the refresh.
        assert row["svds_per_refresh_per_rank"] == [projected] == [row["projected_matrices"]]
        assert row["stepped_optimizer"] == "GradNormLoRPAdamW"
        expected_engine = ENGINE_OPTIMIZER[row["stage"]] or "GradNormLoRPAdamW"
        assert row["engine_optimizer"] == expected_engine


def test_fp32_masters_hold_every_element_once_at_one_rank(report):
    for row in report["rows"]:
        numel = _numel(weight_norm=row["optimizer"] != bench.DEEPSPEED_ADAMW)
        assert row["model_numel"] == numel
        expected = 0 if row["stage"] == 0 else 4 * numel  # ZeRO 0 fp32 keeps no master copy
        assert row["master_bytes_per_rank"] == [expected], (row["optimizer"], row["stage"])


def test_deepspeed_adamw_state_is_two_fp32_moments_and_a_step_per_flat_group(report):
    numel = _numel(weight_norm=False)
    rows = [r for r in report["rows"] if r["optimizer"] == bench.DEEPSPEED_ADAMW]
    for row in rows:
        assert row["stepped_optimizer"] == "AdamW"
        assert row["moment_bytes_per_rank"] == [8 * numel]
        groups = row["flat_state_groups_per_rank"][0]
        # ZeRO 1-3: one flat fp32 partition per group; ZeRO 0: the model's own parameters.
        if row["stage"] >= 1:
            assert groups == 1
        else:
            assert groups == len(list(build_model(_tiny_config()).parameters()))
        assert row["state_bytes_max"] == 8 * numel + 4 * groups  # torch keeps step as a tensor
        assert row["svds_per_refresh_total"] == 0


def test_ratios_against_deepspeed_adamw_are_measured_in_the_same_run(report):
    rows = {(r["optimizer"], r["stage"]): r for r in report["rows"]}
    ours, ds = rows[(bench.OURS, 2)], rows[(bench.DEEPSPEED_ADAMW, 2)]
    assert ours["state_max_over_deepspeed_adamw"] == ours["state_bytes_max"] / ds["state_bytes_max"]
    # No DeepSpeed AdamW row at stage 1 in this run: no ratio rather than a made-up one.
    assert rows[(bench.OURS_8BIT, 1)]["state_max_over_deepspeed_adamw"] is None


def test_invariants_pass_here_and_catch_a_state_that_does_not_shrink(report):
    rows = report["rows"]
    assert report_of.check_invariants(rows)
    grown = dict(rows[1], world_size=2)  # ours, ZeRO 2, pretending 2 ranks held as much as 1
    with pytest.raises(AssertionError):
        report_of.check_invariants([rows[1], grown])


def test_compare_table_reports_ratios_to_deepspeed(report):
    rows = [r for r in report["rows"] if r["stage"] == 2]
    lines = report_of.compare_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[-1].split()[0] == bench.DEEPSPEED_ADAMW
    assert "1.000" in lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_mode_without_a_gpu_fails_with_a_clear_message(capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--device", "cuda"])
    assert "--device cuda needs a CUDA GPU" in capsys.readouterr().err
