"""benchmarks/gpu_check.py on a CPU: arguments, plan, budget, process groups, verdicts, and every
section's code run end to end at CPU-sized shapes (``--device cpu --tiny``).

The figures need a CUDA device; what a CPU proves is that nothing in the check fails for a
reason a GPU would not fix: a missing import, a typo, a section that cannot end in its share,
a child left running, a skip read as a pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, gpu_sections
from benchmarks.gpu_rows import FAIL, PASS, SKIP, Rows, row, section_status

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_imports_every_section_and_touches_no_gpu(capsys, monkeypatch, tmp_path):
    def no_cuda(*args, **kwargs):
        raise AssertionError("--dry-run initialised CUDA")

    monkeypatch.setattr(torch.cuda, "init", no_cuda)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    assert gpu_check.main(["--dry-run", "--quick", "--out-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    for section in gpu_check.SECTIONS:
        assert f"  {section.name}" in printed and section.what in printed
        for module in (*section.imports, section.module):
            name = module.removesuffix(":data")
            assert re.search(rf"^  {re.escape(name)} +PASS", printed, re.M), module
    assert "quick" in printed
    assert not (tmp_path / "out").exists()  # a plan writes nothing


def test_dry_run_fails_naming_a_module_that_does_not_import(capsys, monkeypatch):
    svd = gpu_check.BY_NAME["svd"]
    broken = dataclasses.replace(svd, imports=(*svd.imports, "no_such_module_for_gpu_check"))
    monkeypatch.setitem(gpu_check.BY_NAME, "svd", broken)
    assert gpu_check.main(["--dry-run", "--sections", "svd"]) == 2
    captured = capsys.readouterr()
    assert re.search(r"no_such_module_for_gpu_check +FAIL +ModuleNotFoundError", captured.out)
    assert "cannot import no_such_module_for_gpu_check" in captured.err


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
    bad = [part for part in value.split(",") if part not in gpu_check.BY_NAME][0]
    assert f"unknown section {bad!r}" in err and "recipe_7b" in err


def test_without_cuda_it_exits_2_and_writes_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--quick", "--out-dir", str(tmp_path / "out")]) == 2
    assert gpu_check.NO_CUDA in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_shares_fit_the_budget_most_valuable_first():
    names = tuple(gpu_check.BY_NAME)
    assert names[0] == "tests" and names[-1] == "bench"  # correctness first, small models last
    deadlines = gpu_check.schedule(names, gpu_check.BUDGET_S)
    assert list(deadlines) == list(names)
    assert sum(s.share_s for s in gpu_check.SECTIONS) == pytest.approx(deadlines["bench"])
    assert deadlines["bench"] <= gpu_check.BUDGET_S <= 480
    assert deadlines["tests"] == gpu_check.BY_NAME["tests"].share_s
    # A smaller budget scales every share alike; the last deadline is the budget.
    small = gpu_check.schedule(names, 230)
    assert small["bench"] == pytest.approx(230)
    assert small["tests"] / small["bench"] == pytest.approx(deadlines["tests"] / deadlines["bench"])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_a_section_out_of_time_is_killed_with_its_children_and_keeps_its_rows(tmp_path):
    rows_file, pid_file, log = tmp_path / "rows.json", tmp_path / "child.pid", tmp_path / "log"
    script = f"""
import json, subprocess, sys, time
from pathlib import Path
from benchmarks.gpu_rows import Rows, row
rows = Rows(Path({str(rows_file)!r}))
rows.append(row("finished before the limit", "PASS", "1 s"))
child = subprocess.Popen(["sleep", "60"])  # what pytest or a compiler would leave running
Path({str(pid_file)!r}).write_text(str(child.pid))
print("started", flush=True)
time.sleep(60)
"""
    began = time.perf_counter()
    code = gpu_check.run_process([sys.executable, "-c", script], timeout=4.0, log=log)
    assert code is None and time.perf_counter() - began < 20
    child = int(pid_file.read_text())
    for _ in range(50):  # reaped by init once its group was killed
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child), "the section's child outlived it"
    assert "started" in log.read_text()
    rows = gpu_check.closing_rows("demo", code, Rows.read(rows_file), 4.0)
    assert [r["status"] for r in rows] == [PASS, FAIL]
    assert "timed out after 4 s" in rows[-1]["figures"]
    assert section_status(rows) == FAIL


def test_a_skip_never_reads_as_a_pass():
    passed, skipped, failed = row("a", PASS), row("b", SKIP), row("c", FAIL)
    assert section_status([passed]) == PASS
    assert section_status([passed, skipped]) == SKIP
    assert section_status([passed, skipped, failed]) == FAIL
    assert section_status([]) == FAIL  # a section that proved nothing
    sections = {"x": {"status": PASS}, "y": {"status": SKIP}}
    assert gpu_check.verdict(sections) == ("INCOMPLETE", gpu_check.EXIT_INCOMPLETE)
    assert gpu_check.verdict({"x": {"status": PASS}}) == (PASS, 0)
    sections["z"] = {"status": FAIL}
    assert gpu_check.verdict(sections) == (FAIL, gpu_check.EXIT_FAILED)
    assert gpu_check.closing_rows("w", 0, Rows(), 1.0)[0]["status"] == FAIL  # exit 0, no rows


def _script_default(name: str) -> str:
    text = (REPO / "launch" / "single_gpu_7b.sh").read_text()
    return re.search(rf"^{name}=\$\{{{name}:-([^}}]+)\}}", text, re.M).group(1)


def test_the_7b_section_runs_the_launch_recipe_and_saves_nothing(tmp_path):
    recipe = gpu_sections.RECIPE_7B
    assert recipe["rank"] == int(_script_default("RANK"))
    assert recipe["update_proj_gap"] == int(_script_default("UPDATE_PROJ_GAP"))
    assert recipe["proj_bits"] == int(_script_default("PROJ_BITS"))
    assert recipe["scale"] == float(_script_default("SCALE"))
    assert recipe["lr"] == float(_script_default("LR"))
    assert recipe["grad_clip"] == float(_script_default("GRAD_CLIP"))
    assert recipe["batch_size"] == int(_script_default("BATCH_SIZE"))
    assert recipe["seq_len"] == int(_script_default("SEQ_LEN"))
    script = (REPO / "launch" / "single_gpu_7b.sh").read_text()
    train_args = script[script.index("TRAIN_ARGS=(") :]
    for flag in ("--bits 8", "--per-layer", "--dtype bf16", "--activation-checkpointing"):
        assert flag in train_args
    config = gpu_sections.recipe_7b_config("cuda", "text.txt", str(tmp_path), 3)
    assert (config.model, config.dtype, config.bits, config.per_layer) == (
        "llama_7b",
        "bf16",
        8,
        True,
    )
    assert config.save_every == 0 and config.resume == "never"
    estimate = gpu_sections.recipe_7b_estimate()  # shape arithmetic: runs on any machine
    assert 16 * 2**30 < estimate.total_bytes < 22 * 2**30
    assert estimate.config.activation_checkpointing and estimate.config.proj_bits == 8


@pytest.mark.slow
@pytest.mark.usefixtures("offline_shared_cache")
def test_every_section_runs_end_to_end_on_a_cpu(tmp_path):
    """Every section's code, at CPU-sized shapes, through the real driver: workers, rows,
    JSON, table and log. The GPU tests skip here, so the verdict must be INCOMPLETE."""
    out = tmp_path / "out"
    env_before = dict(os.environ)
    code = gpu_check.main(["--device", "cpu", "--tiny", "--quick", "--out-dir", str(out)])
    assert dict(os.environ) == env_before  # the sections' environment stayed in the workers
    payload = json.loads((out / "gpu_check.json").read_text())
    sections = payload["sections"]
    assert list(sections) == list(gpu_check.BY_NAME) == payload["completed"]
    failed = {
        name: [r["figures"] for r in s["rows"] if r["status"] == FAIL]
        for name, s in sections.items()
        if s["status"] == FAIL
    }
    assert not failed, failed
    assert code == gpu_check.EXIT_INCOMPLETE and payload["verdict"] == "INCOMPLETE"
    tests = sections["tests"]
    assert tests["status"] == SKIP and len(tests["rows"]) >= 10
    assert all("needs a CUDA device" in r["figures"] for r in tests["rows"])
    recipe = {r["check"]: r["status"] for r in sections["recipe_7b"]["rows"]}
    assert recipe == {"7B recipe: steps": PASS, "7B recipe: peak vs estimate": SKIP}
    for name in ("deepspeed", "llama_1b", "svd", "eightbit", "bench"):
        assert sections[name]["status"] == PASS, sections[name]
    assert {r["check"] for r in sections["deepspeed"]["rows"]} == {
        "deepspeed ZeRO-2",
        "deepspeed ZeRO-3",
    }
    assert len(sections["llama_1b"]["rows"]) == 4 and len(sections["eightbit"]["rows"]) == 5
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("# gpu_check on no GPU: INCOMPLETE")
    assert table.count("\n| ") >= sum(len(s["rows"]) for s in sections.values())
    assert "===== deepspeed" in (out / "sections.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json",
        "gpu_check.md",
        "sections.log",
    ]


@pytest.mark.skipif(
    not hasattr(torch.backends.cudnn, "fp32_precision"), reason="torch < 2.9: legacy flags only"
)
def test_the_zero_comparison_uses_eager_attention_and_full_fp32():
    """SDPA's GPU kernels may reduce differently run to run, and TF32 keeps 10 mantissa bits:
    either would swamp the 1e-4 the ZeRO rows compare at."""
    model = gpu_sections._ds_model("cpu")
    assert model.config._attn_implementation == "eager"
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision, torch.backends.cudnn.fp32_precision
    try:
        matmul.fp32_precision = torch.backends.cudnn.fp32_precision = "tf32"
        gpu_sections.tf32_off()
        assert (matmul.fp32_precision, torch.backends.cudnn.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, torch.backends.cudnn.fp32_precision = saved
