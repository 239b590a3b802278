"""gnlorp-train under real launchers with 2 CPU processes, the world size asserted.

Three launches: torchrun (DDP), `accelerate launch --multi_gpu` (owner-side gradient reduction),
and `accelerate launch --cpu`, which starts ONE process and must be refused. The 2-process
checkpoint then resumes on one process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gnlorp_dist.checkpoint.manifest import write_manifest

TINY_JSON = {
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
}  # fmt: skip
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY_JSON))
    env = dict(os.environ, OMP_NUM_THREADS="1", GNLORP_CACHE_DIR=str(root / "cache"))
    env.pop("WORLD_SIZE", None)
    return root, str(config), env


def _train_args(config, out, *extra):
    return [
        "--model-config", config, "--seq-len", "32", "--batch-size", "2", "--max-steps", "4",
        "--save-every", "2", "--eval-batches", "1", "--output-dir", str(out), "--no-progress",
        "--log-every", "1", *extra,
    ]  # fmt: skip


def _run(command, env, timeout=300):
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def _shards(folder):
    return sorted(p.name for p in folder.glob("optimizer-shard-*"))


def test_torchrun_two_processes_then_resume_on_one(setting):
    root, config, env = setting
    out = root / "torchrun"
    command = [
        str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "gnlorp_dist.training.run", "--world-size", "2",
        *_train_args(config, out),
    ]  # fmt: skip
    code, output = _run(command, env)
    assert code == 0, output
    # The default with several processes: only low-rank gradients travel; clipping says so.
    assert "distributed: 2 processes (low-rank gradient reduction)" in output
    assert "global norm of what the optimizer consumes" in output
    assert len(re.findall(r"step +4/4 \| loss", output)) == 1  # rank 0 logs alone
    step4 = out / "checkpoints" / "step-00000004"
    assert _shards(step4) == [
        "optimizer-shard-00000-of-00002.pt",
        "optimizer-shard-00001-of-00002.pt",
    ]
    assert (out / "final" / "model.safetensors").is_file()
    # Kept for the resume on one process below (pruned once this run continues to step 6).
    shutil.copytree(out / "checkpoints" / "step-00000002", root / "step-2-of-two-processes")

    # Same global batch (2 x 2) on one process: the sharded state is resharded to one rank.
    code, output = _run(
        [sys.executable, "-m", "gnlorp_dist.training.run",
         *_train_args(config, out, "--batch-size", "4", "--max-steps", "6")],
        env,
    )  # fmt: skip
    assert code == 0, output
    assert "resumed from" in output and "(step 4)" in output
    assert _shards(out / "checkpoints" / "step-00000006") == ["optimizer-shard-00000-of-00001.pt"]


def _max_difference(folder, reference):
    ours, theirs = (
        load_file(folder / "model.safetensors"),
        load_file(reference / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    return max(float((ours[name] - theirs[name]).abs().max()) for name in ours)


def _clip_rule(checkpoint):
    return json.loads((checkpoint / "run_config.json").read_text())["clip_norm_of"]


def test_defaults_on_one_process_match_two_processes_on_the_same_global_batch(setting):
    """--clip-norm-of auto means one rule at every world size: 1 x 4 sequences end where the
    first test's 2 x 2 ended (order of tests matters). Measured 9.8e-3 apart when auto clipped
    the full gradient on one process and the consumed low-rank ones on two; 3.1e-5 once both
    clip the consumed tensors (summation order, amplified by Adam in rarely seen embedding
    rows)."""
    root, config, env = setting
    out = root / "one-process"
    code, output = _run(
        [sys.executable, "-m", "gnlorp_dist.training.run",
         *_train_args(config, out, "--batch-size", "4")],
        env,
    )  # fmt: skip
    assert code == 0, output
    assert "global norm of what the optimizer consumes" in output
    ours, theirs = out / "checkpoints" / "step-00000004", root / "torchrun" / "checkpoints"
    assert _max_difference(ours, theirs / "step-00000004") < 1e-4
    # The resolved rule is recorded, never "auto", at either world size.
    assert _clip_rule(ours) == _clip_rule(theirs / "step-00000004") == "consumed"


def test_a_two_process_checkpoint_from_before_the_rule_was_recorded_resumes_on_one_with_it(
    setting,
):
    """The first test's step-2 checkpoint, made to record "auto" as checkpoints written before
    the rule was recorded do, resumes on one process with the rule its 2 processes used (the
    consumed norm) and ends at the 2-process run's step 4: measured 9.1e-7 apart (2.5e-3 when
    the resumed run switched to the full norm; 1.1e-6 before the low-rank reduction became the
    default)."""
    root, config, env = setting
    out = root / "resumed-on-one"
    step2 = out / "checkpoints" / "step-00000002"
    shutil.copytree(root / "step-2-of-two-processes", step2)
    record = json.loads((step2 / "run_config.json").read_text())
    (step2 / "run_config.json").write_text(json.dumps({**record, "clip_norm_of": "auto"}))
    manifest = json.loads((step2 / "manifest.json").read_text())
    write_manifest(step2, step=manifest["step"], branch=manifest["branch"])
    code, output = _run(
        [sys.executable, "-m", "gnlorp_dist.training.run",
         *_train_args(config, out, "--batch-size", "4")],
        env,
    )  # fmt: skip
    assert code == 0, output
    assert "resumed from" in output and "(step 2)" in output
    assert "records --clip-norm-of auto" in output and "2 processes" in output
    step4 = out / "checkpoints" / "step-00000004"
    assert _max_difference(step4, root / "torchrun" / "checkpoints" / "step-00000004") < 1e-5
    assert _clip_rule(step4) == "consumed"


def test_accelerate_multi_gpu_on_cpu_matches_torchrun(setting):
    """Same settings as the torchrun run: the same weights at step 4 (order of tests matters),
    here with the low-rank reductions run in the step (--overlap-reduction off; torchrun's run
    started them inside backward, the default) and the directions applied in the next forward
    (--overlap-directions on; the checkpoint applies the last step's first)."""
    root, config, env = setting
    out = root / "accelerate"
    command = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "gnlorp_dist.training.run",
        "--world-size", "2", "--overlap-reduction", "off", "--overlap-directions", "on",
        *_train_args(config, out),
    ]  # fmt: skip
    code, output = _run(command, dict(env, ACCELERATE_USE_CPU="1"))
    assert code == 0, output
    assert "distributed: 2 processes (low-rank gradient reduction)" in output
    assert "directions applied in the next forward (--overlap-directions on)" in output
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", output).groups())
    assert last < first
    ours = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    theirs = load_file(root / "torchrun" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)


def test_torchrun_per_layer_8bit_accumulation_with_low_rank_reduction(setting):
    root, config, env = setting
    out = root / "per-layer"
    command = [
        str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "gnlorp_dist.training.run", "--world-size", "2",
        "--per-layer", "--bits", "8", "--grad-accum", "2", "--grad-reduction", "lowrank",
        "--grad-clip", "0", *_train_args(config, out),
    ]  # fmt: skip
    code, output = _run(command, env)
    assert code == 0, output
    assert "distributed: 2 processes (low-rank gradient reduction)" in output
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", output).groups())
    assert last < first
    assert (out / "final" / "model.safetensors").is_file()


def test_accelerate_cpu_flag_starting_one_process_is_refused(setting):
    root, config, env = setting
    command = [
        str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gnlorp_dist.training.run",
        *_train_args(config, root / "refused"),
    ]  # fmt: skip
    code, output = _run(command, env)
    assert code != 0
    assert "asked for 2 processes" in output and "runs alone" in output
    assert not (root / "refused" / "checkpoints").exists()  # refused before any training


def test_torchrun_killed_during_a_checkpoint_write_resumes_like_the_uninterrupted_run(setting):
    """SIGKILL on both ranks between the optimizer shards and the model file of step 4's
    checkpoint (GNLORP_FAULT); a new torchrun job resumes from step 2 and ends where the
    uninterrupted 2-rank run of the first test ended (order of tests matters)."""
    root, config, env = setting
    out = root / "killed"

    def torchrun(extra_env):
        command = [
            str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "gnlorp_dist.training.run", "--world-size", "2",
            *_train_args(config, out),
        ]  # fmt: skip
        return _run(command, dict(env, **extra_env))

    code, output = torchrun({"GNLORP_FAULT": "checkpoint.after_optimizer@4"})
    assert code != 0 and "SIGKILL" in output, output[-3000:]
    assert not (out / "checkpoints" / "step-00000004").exists()
    code, output = torchrun({})
    assert code == 0, output
    assert "resumed from" in output and "(step 2)" in output
    ours = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    theirs = load_file(root / "torchrun" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-8)
