"""Real clients with GradNormLoRPAdamW on CPU: transformers.Trainer, TRL's SFTTrainer, Accelerate.

Trainer / SFTTrainer (tests/distributed/clients_script.py): ONE torchrun launch of 2 ranks runs
DDP (our Trainer subclass, and a stock Trainer given the plain function + callback), SFTTrainer
under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (``TrainingArguments(deepspeed=...)``), each 12 steps with
refreshes at 0/4/8, a checkpoint at step 6 and a resume from it; then ONE one-process launch
runs the references and resumes the 2-rank DDP checkpoint on one process. Accelerate: the
example script (examples/accelerate_train.py) on 2 DDP ranks saves its state at step 10, a new
job loads it and finishes; the same for the DeepSpeed plugin at ZeRO-3.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .test_launchers import _free_port

pytest.importorskip("trl")
pytest.importorskip("deepspeed")

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("clients_script.py")
EXAMPLE = REPO / "examples" / "accelerate_train.py"
NUM_PROJECTED, REFRESH_STEPS = 14, 3  # 2 layers x 7 projections; refreshes at steps 0, 4, 8
TWO_RANK_TOLERANCE = 1e-4
"""2 ranks against one process, 12 steps: summation order only (measured 9e-7 to 1e-6)."""
RESUME_TOLERANCE = 1e-5
LOGIT_TOLERANCE = 1e-5


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(command: list[str], env: dict[str, str], timeout: int = 400) -> str:
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def _torchrun(*args: str) -> list[str]:
    return [
        str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), *args,
    ]  # fmt: skip


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).norm()) ** 2 for k in b) ** 0.5
    return num / sum(float(b[k].norm()) ** 2 for k in b) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("clients")
    _run(_torchrun(str(SCRIPT), str(out), "two"), _env())
    _run([sys.executable, str(SCRIPT), str(out), "one"], _env())
    results = torch.load(out / "two.pt", weights_only=False)
    results.update(torch.load(out / "one.pt", weights_only=False))
    return out, results


@pytest.mark.parametrize("name", ["ddp", "ddp-plain", "sft", "zero2", "zero3"])
def test_two_ranks_match_one_process(runs, name):
    _, r = runs
    reference = r["sft-one" if name == "sft" else "one"]
    assert r[name]["world"] == 2 and reference["world"] == 1
    engine = {"zero2": "DeepSpeedEngine", "zero3": "DeepSpeedEngine"}.get(
        name, "DistributedDataParallel"
    )
    assert r[name]["deepspeed"] == engine  # DeepSpeed really ran (not silently dropped)
    assert r[name]["zero3_partitioned"] == (name == "zero3")
    error = _rel(r[name]["weights"], reference["weights"])
    print(f"{name}: 2 ranks vs one process {error:.2e}")
    assert error < TWO_RANK_TOLERANCE
    assert r[name]["loss"][-1] < 0.85 * r[name]["loss"][0]  # it trains


def test_sft_trainer_matches_trainer_on_one_process(runs):
    _, r = runs
    assert _rel(r["sft-one"]["weights"], r["one"]["weights"]) < TWO_RANK_TOLERANCE


@pytest.mark.parametrize("name", ["one", "sft-one", "ddp", "ddp-plain", "sft", "zero2", "zero3"])
def test_projected_groups_really_stepped(runs, name):
    # Each subspace is computed once in the whole job (summed over ranks) at every refresh step:
    # a plain-AdamW fallback (a group without rank) would count none.
    _, r = runs
    assert r[name]["refreshes"] == NUM_PROJECTED * REFRESH_STEPS


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_resume_from_trainer_checkpoint_on_the_same_world_size(runs, name):
    _, r = runs
    resumed = r[f"{name}-resume"]
    assert resumed["world"] == 2
    assert resumed["refreshes"] == NUM_PROJECTED  # step 8 only: the states came back
    error = _rel(resumed["weights"], r[name]["weights"])
    print(f"{name}: resumed at step 6 vs uninterrupted {error:.2e}")
    assert error < RESUME_TOLERANCE


def test_resume_ddp_checkpoint_on_another_world_size(runs):
    _, r = runs
    moved = r["ddp-to-one"]
    assert moved["world"] == 1
    assert moved["refreshes"] == NUM_PROJECTED
    error = _rel(moved["weights"], r["ddp"]["weights"])
    print(f"2-rank DDP checkpoint resumed on 1 process: {error:.2e} from the 2-rank run")
    assert error < RESUME_TOLERANCE


@pytest.mark.parametrize("name", ["one", "ddp", "sft", "zero2", "zero3"])
def test_save_model_loads_in_stock_transformers(runs, name):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .clients_script import build_model

    out, r = runs
    folder = out / {"one": "one", "sft": "sft"}.get(name, name) / "merged"
    saved = load_file(folder / "model.safetensors")
    assert not any("direction" in k or "magnitude" in k for k in saved)  # merged
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    trained = build_model()
    trained.load_state_dict(r[name]["weights"])
    ids = torch.arange(3, 19).reshape(1, 16)
    with torch.no_grad():
        diff = float((stock(ids).logits - trained.eval()(ids).logits).abs().max())
    print(f"{name}: save_model() reloaded by from_pretrained, max |logit diff| {diff:.1e}")
    assert diff < LOGIT_TOLERANCE
    # The Trainer's own checkpoints keep the unmerged weights that resume loads back.
    checkpoint = out / {"one": "one", "sft": "sft"}.get(name, name) / "checkpoint-6"
    if name.startswith("zero"):
        assert any(checkpoint.glob("global_step6"))  # DeepSpeed's own checkpoint
    else:
        assert any("direction" in k for k in load_file(checkpoint / "model.safetensors"))


def _example(out: Path, env: dict[str, str], *extra: str) -> str:
    output = _run(_torchrun(str(EXAMPLE), "--out", str(out), *extra), env)
    assert "| world 2" in output  # two synchronised processes, not two that think they are alone
    return output


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_accelerate_script_save_state_load_state_round_trip(tmp_path, engine):
    if engine == "ddp":
        env, extra, expected = _env(ACCELERATE_USE_CPU="1"), [], "engine MULTI_CPU"
    else:
        env, extra, expected = _env(), ["--zero-stage", "3"], "engine DEEPSPEED"
    straight = tmp_path / "straight"
    assert expected in _example(straight, env, *extra)
    resumed = tmp_path / "resumed"
    output = _example(resumed, env, *extra, "--resume", str(straight / "state-10"))
    assert expected in output and "step 11/20" in output and "step 10/20" not in output
    error = _rel(torch.load(resumed / "weights.pt"), torch.load(straight / "weights.pt"))
    print(f"accelerate {engine}: load_state at step 10 in a new job vs uninterrupted {error:.2e}")
    assert error < RESUME_TOLERANCE
