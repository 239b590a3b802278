"""benchmarks/gpu_check.py on a CPU: its arguments, its plan, and its refusal without a GPU.

The checks themselves need a CUDA device; what a CPU can prove is that the script refuses
clearly, validates what it is given, and plans every section.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402


def test_dry_run_lists_every_section_and_touches_no_gpu(capsys, monkeypatch, tmp_path):
    def no_cuda(*args, **kwargs):
        raise AssertionError("--dry-run touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert list(gpu_check.SECTIONS) == ["tests", "bench", "recipe_7b", "deepspeed"]
    for name, (what, _) in gpu_check.SECTIONS.items():
        assert f"  {name}" in printed and what in printed
    assert "quick" in printed and str(out) in printed
    assert not out.exists()  # a plan writes nothing


def test_sections_are_chosen_in_order_space_or_comma_separated(capsys):
    args = gpu_check.parse_args(["--sections", "deepspeed,tests", "bench", "tests", "--dry-run"])
    assert args.sections == ("deepspeed", "tests", "bench")
    assert gpu_check.main(["--sections", "recipe_7b", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "recipe_7b" in printed and "deepspeed" not in printed


@pytest.mark.parametrize("value", ["gpu", "tests,benchmark"])
def test_an_unknown_section_is_an_error_naming_it(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--sections", value, "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    bad = [part for part in value.split(",") if part not in gpu_check.SECTIONS][0]
    assert f"unknown section {bad!r}" in err and "recipe_7b" in err


def test_without_cuda_it_exits_2_with_the_message(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert gpu_check.NO_CUDA in err
    assert "no CUDA device: gpu_check needs one GPU" in err
    assert not out.exists()


def test_the_7b_recipe_is_the_papers_and_saves_nothing(tmp_path):
    config = gpu_check.recipe_7b_config("cuda", "text.txt", str(tmp_path))
    assert (config.model, config.dtype, config.bits, config.rank) == ("llama_7b", "bf16", 8, 1024)
    assert config.per_layer and (config.seq_len, config.batch_size, config.max_steps) == (256, 1, 3)
    assert config.save_every == 0 and config.resume == "never"
    estimate = gpu_check.recipe_7b_estimate()  # shape arithmetic: runs on any machine
    assert 15e9 < estimate.total_bytes < 30e9
    assert estimate.config.per_layer and estimate.config.state_bits == 8
