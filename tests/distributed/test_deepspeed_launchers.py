"""gnlorp-train --deepspeed under four real launchers, 2 CPU processes, the world size asserted.

`deepspeed --num_gpus 2` (ZeRO-3), `torchrun` (ZeRO-2, resumed on 2 ranks and on 1), `mpirun -n 2`
through mpi4py discovery (ZeRO-1) and `accelerate launch` with the DeepSpeed plugin YAML of
launch/ (ZeRO-2 from ds_configs/). Each trains the embedded Shakespeare corpus. A DeepSpeed JSON
that names an optimizer fails before any training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .test_launchers import TINY_JSON, _free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds-launch")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY_JSON))
    env = dict(
        os.environ, OMP_NUM_THREADS="1", GNLORP_CACHE_DIR=str(root / "cache"), DS_ACCELERATOR="cpu"
    )
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return root, str(config), env


def _train_args(config, out, ds_config, *extra):
    return [
        "--model-config", config, "--seq-len", "32", "--batch-size", "2", "--max-steps", "3",
        "--save-every", "3", "--eval-batches", "1", "--output-dir", str(out), "--no-progress",
        "--log-every", "1", "--world-size", "2", "--deepspeed", str(REPO / "ds_configs" / ds_config),
        *extra,
    ]  # fmt: skip


def _run(command, env, timeout=400):
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    return result.returncode, result.stdout + result.stderr


def _assert_trained(code, output, out, stage):
    assert code == 0, output[-6000:]
    assert f"deepspeed: ZeRO-{stage}, fp32, 2 process(es)" in output
    assert len(re.findall(r"step +3/3 \| loss", output)) == 1  # rank 0 logs alone
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", output).groups())
    assert last < first
    assert (out / "ds_checkpoints" / "step-00000003").is_dir()
    assert (out / "final" / "model.safetensors").is_file()
    diff = float(re.search(r"max \|logit diff\| ([\d.e+-]+)", output).group(1))
    assert diff < 1e-4


def test_deepspeed_launcher_zero3(setting):
    root, config, env = setting
    out = root / "deepspeed"
    command = [
        str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
        "--module", "gnlorp_dist.training.run", *_train_args(config, out, "zero3.json"),
    ]  # fmt: skip
    _assert_trained(*_run(command, env), out, 3)


def _rewind(source, target, step):
    """A copy of a finished run whose newest checkpoint is ``step`` (later ones removed)."""
    shutil.copytree(source, target)
    root = target / "ds_checkpoints"
    for later in root.glob("step-*"):
        if int(later.name.removeprefix("step-")) > step:
            shutil.rmtree(later)
    (root / "latest").write_text(f"step-{step:08d}")


def _final_weights(out):
    return load_file(out / "final" / "model.safetensors")


def _rel(a, b):
    num = sum(float((a[k] - b[k]).norm()) ** 2 for k in b) ** 0.5
    return num / sum(float(b[k].norm()) ** 2 for k in b) ** 0.5


def test_torchrun_zero2_resumes_on_two_ranks_and_reshards_to_one(setting):
    root, config, env = setting
    out = root / "torchrun"
    torchrun = [
        str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "gnlorp_dist.training.run",
    ]  # fmt: skip
    args = _train_args(config, out, "zero2.json", "--save-every", "2")
    _assert_trained(*_run([*torchrun, *args], env), out, 2)
    straight = _final_weights(out)
    # Same ranks: DeepSpeed's own load, bit for bit the straight run.
    same = root / "same-ranks"
    _rewind(out, same, 2)
    code, output = _run([*torchrun, *_train_args(config, same, "zero2.json")], env)
    assert code == 0, output[-6000:]
    assert "resumed from" in output and "(step 2)" in output
    assert _rel(_final_weights(same), straight) < 1e-6
    # One process, ZeRO-3, the same global batch (4 x 1): weights rebuilt from the ZeRO-2
    # partitions, low-rank states merged and re-cut for one rank.
    moved = root / "one-rank"
    _rewind(out, moved, 2)
    args = _train_args(config, moved, "zero3.json", "--batch-size", "4")
    args[args.index("--world-size") + 1] = "1"
    code, output = _run([sys.executable, "-m", "gnlorp_dist.training.run", *args], env)
    assert code == 0, output[-6000:]
    assert "resumed from" in output and "(step 2)" in output
    error = _rel(_final_weights(moved), straight)
    print(f"2-rank ZeRO-2 checkpoint resumed on 1 rank under ZeRO-3: {error:.2e} from 2 ranks")
    assert error < 1e-4


def test_mpirun_zero1_through_mpi4py_discovery(setting):
    root, config, env = setting
    mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not installed (pip install 'gnlorp-dist[mpi]')")
    out = root / "mpirun"
    env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    command = [
        mpirun, "-n", "2", "--allow-run-as-root", "--oversubscribe",
        *[arg for name in ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "GNLORP_CACHE_DIR",
                           "DS_ACCELERATOR", "PATH") for arg in ("-x", name)],
        sys.executable, "-m", "gnlorp_dist.training.run", *_train_args(config, out, "zero1.json"),
    ]  # fmt: skip
    _assert_trained(*_run(command, env), out, 1)


def test_accelerate_launch_with_the_deepspeed_plugin(setting):
    root, config, env = setting
    out = root / "accelerate"
    args = _train_args(config, out, "zero2.json")
    del args[args.index("--deepspeed") : args.index("--deepspeed") + 2]  # from the plugin
    command = [
        str(BIN / "accelerate"), "launch", "--config_file",
        str(REPO / "launch" / "accelerate_deepspeed.yaml"), "--use_deepspeed",
        "--num_processes", "2", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(_free_port()), "-m", "gnlorp_dist.training.run", *args,
    ]  # fmt: skip
    _assert_trained(*_run(command, env), out, 2)


def test_config_naming_an_optimizer_fails_before_training(setting):
    root, config, env = setting
    bad = root / "with-optimizer.json"
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    bad.write_text(json.dumps(ds))
    out = root / "bad"
    args = _train_args(config, out, "zero2.json")
    args[args.index("--deepspeed") + 1] = str(bad)
    args[args.index("--world-size") + 1] = "1"
    code, output = _run([sys.executable, "-m", "gnlorp_dist.training.run", *args], env)
    assert code == 2
    assert "names an optimizer ('AdamW')" in output and 'Delete the "optimizer" block' in output
    assert not out.exists() or not any(out.rglob("step-*"))
