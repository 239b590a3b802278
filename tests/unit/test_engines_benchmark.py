"""The accounting of ``benchmarks/distributed.py --engines`` (DDP / ZeRO-2 / FSDP2), in one
process: byte counting (:mod:`gnlorp_dist.bench.engines`), per-rank summaries, ratios against
DDP, failure rows (:mod:`gnlorp_dist.bench.engines_report`), the command line. The launches
themselves are the benchmark's (forked gloo ranks, DeepSpeed); nothing here times anything."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks import distributed as script
from gnlorp_dist import GradNormLoRPAdamW
from gnlorp_dist.bench import engines, engines_report
from gnlorp_dist.optim.comm import LocalCommunicator


def test_local_nbytes_walks_containers_and_ignores_numbers() -> None:
    value = {"a": torch.zeros(3, 4), "b": [torch.zeros(2, dtype=torch.int8), 7], "c": 1.5}
    assert engines.local_nbytes(value) == 3 * 4 * 4 + 2
    assert engines.local_nbytes(None) == 0


def test_optimizer_state_bytes_counts_every_tensor_and_the_bases_apart() -> None:
    weight = torch.nn.Parameter(torch.zeros(6, 4))
    weight.grad = torch.randn(6, 4)
    group = {
        "params": [weight],
        "rank": 2,
        "update_proj_gap": 10,
        "scale": 0.25,
        "proj_type": "std",
    }
    optimizer = GradNormLoRPAdamW([group], communicator=LocalCommunicator())
    optimizer.step()
    expected = sum(v.nbytes for v in optimizer.state[weight].values() if torch.is_tensor(v))
    counts = engines.optimizer_state_bytes(optimizer)
    # 6x4: right projection, moments 6x2 (fp32), basis 2x4.
    assert counts == {"state": expected, "proj": 2 * 4 * 4}
    assert expected >= 2 * 6 * 2 * 4 + 2 * 4 * 4


def _rank(engine: str, state: int, step_s: list[float]) -> dict[str, Any]:
    return {
        "engine": engine,
        "how": engine,
        "state_bytes": state,
        "proj_bytes": 8,
        "weight_bytes": 100,
        "weight_bytes_full": 200,
        "master_bytes": 0,
        "refreshes": 1,
        "projected_matrices": 2,
        "losses": [3.0, 2.5],
        "step_s": step_s,
    }


def test_rows_take_the_slowest_rank_per_step_and_ratios_against_ddp() -> None:
    ddp = engines_report.summarise_engine(
        "ddp", [_rank("ddp", 100, [1.0, 3.0, 2.0]), _rank("ddp", 60, [2.0, 1.0, 1.0])]
    )
    assert ddp["state_bytes_max"] == 100 and ddp["state_bytes_mean"] == 80
    assert ddp["step_s_slowest_rank"] == [2.0, 3.0, 2.0] and ddp["step_s_median"] == 2.0
    fsdp2 = engines_report.summarise_engine(
        "fsdp2", [_rank("fsdp2", 50, [1.0, 1.0, 1.0]), _rank("fsdp2", 50, [1.0, 1.0, 1.0])]
    )
    failed = {"engine": "zero2", "error": "boom"}
    rows = [ddp, failed, fsdp2]
    engines_report.add_engine_ratios(rows, one_process_bytes=160, world=2)
    assert fsdp2["state_max_over_ddp"] == 0.5 and fsdp2["step_median_over_ddp"] == 0.5
    assert ddp["state_max_over_one_process_n"] == 100 / 80
    assert "state_max_over_ddp" not in failed
    table = engines_report.engine_table(rows)
    assert "failed (below)" in table and table.count("\n") == 4


def test_rounds_pool_the_timed_steps_rank_by_rank() -> None:
    first = [_rank("ddp", 100, [1.0, 2.0]), _rank("ddp", 60, [3.0, 4.0])]
    second = [_rank("ddp", 100, [5.0]), _rank("ddp", 60, [6.0])]
    pooled = engines_report.pool_rounds([first, second])
    assert [r["step_s"] for r in pooled] == [[1.0, 2.0, 5.0], [3.0, 4.0, 6.0]]
    assert [r["state_bytes"] for r in pooled] == [100, 60]
    assert pooled[0]["launch_medians_s"] == [3.5, 6.0]  # slowest rank per step, then median
    assert first[0]["step_s"] == [1.0, 2.0]  # the launches' own results are left alone


def test_step_ratio_pairs_launches_of_the_same_round() -> None:
    def engine(name: str, launches: list[list[float]]) -> dict[str, Any]:
        rounds = [[_rank(name, 10, steps), _rank(name, 10, steps)] for steps in launches]
        return engines_report.summarise_engine(name, engines_report.pool_rounds(rounds))

    # Round 2 ran on a machine twice as busy: paired by round, the ratio is 1.5 in both.
    ddp = engine("ddp", [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    fsdp2 = engine("fsdp2", [[1.5, 1.5, 1.5], [3.0, 3.0, 3.0]])
    engines_report.add_engine_ratios([ddp, fsdp2], one_process_bytes=20, world=2)
    assert fsdp2["launch_step_s_medians"] == [1.5, 3.0]
    assert fsdp2["step_median_over_ddp"] == 1.5 and ddp["step_median_over_ddp"] == 1.0


def test_ratios_are_none_without_a_ddp_row() -> None:
    row = engines_report.summarise_engine(
        "fsdp2", [_rank("fsdp2", 10, [1.0]), _rank("fsdp2", 10, [1.0])]
    )
    engines_report.add_engine_ratios([row], one_process_bytes=20, world=2)
    assert row["state_max_over_ddp"] is None and row["state_max_over_one_process_n"] == 1.0


def test_failure_summary_names_the_error_and_the_deepest_library_frame() -> None:
    message = (
        "\n\n-- Process 0 terminated with the following error:\nTraceback (most recent call last):\n"
        '  File "/x/benchmarks/distributed.py", line 9, in _run_engine\n'
        '  File "/x/gnlorp_dist/optim/adamw.py", line 259, in step\n'
        '  File "/x/gnlorp_dist/optim/comm.py", line 176, in step_verdict\n'
        '  File "/v/torch/distributed/tensor/_dispatch.py", line 531, in tail\n'
        "AssertionError\n"
    )
    summary = engines.failure_summary(RuntimeError(message))
    assert summary == "AssertionError (at gnlorp_dist/optim/comm.py:176)"
    assert engines.failure_summary(RuntimeError("process 1 terminated with signal SIGABRT")) == (
        "process 1 terminated with signal SIGABRT"
    )


@pytest.mark.parametrize("argv", [["--engines", "ddp", "--worlds", "2", "4"]])
def test_engines_mode_compares_on_one_world_size(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        script.main(argv)
