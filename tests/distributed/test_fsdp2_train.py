"""FSDP2 on CPU ranks (gloo): the API, ``gnlorp-train --fsdp``, and the Accelerate FSDP2 example.

Launches are few and shared: the API scenarios run in two forked jobs (2 then 3 ranks); the CLI
trains once on 2 ranks (the reference) and resumes that run's step-4 checkpoint on 3 ranks and on
1 process, each ending where the uninterrupted run ended; the Accelerate example runs on 2
processes and resumes its saved state on 1. Every launch asserts the world size it expected.
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

from tests.distributed.harness import run_ranks
from tests.tiny_llama import TINY_JSON, small_llama

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
OPTIMIZER = "gradnormlorp"
"""The optimizer every scenario steps (the projected one: what FSDP2 support is for)."""
# Resharding moves each SVD and each dense row block to another rank; results agree to
# float32 summation order, not bitwise.
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY_JSON))
    env = dict(os.environ, OMP_NUM_THREADS="1", GNLORP_CACHE_DIR=str(root / "cache"))
    env.pop("WORLD_SIZE", None)
    return root, str(config), env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- API (forked)


def _model():
    from gnlorp_dist.nn import apply_weight_norm  # noqa: PLC0415

    torch.manual_seed(0)
    return apply_weight_norm(
        small_llama(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    )


def _optimizer(model):
    from gnlorp_dist import GradNormLoRPAdamW, projected_param_groups  # noqa: PLC0415

    if OPTIMIZER == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    groups = projected_param_groups(model, rank=4, update_proj_gap=2, scale=0.25)
    return GradNormLoRPAdamW(groups, lr=1e-2)


def _train(model, optimizer, steps, rank, world):
    for step in steps:
        ids = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(step))
        ids = ids.chunk(world)[rank]
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


def _save_then_continue(rank, world, folder):
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    from gnlorp_dist.distributed import (  # noqa: PLC0415
        full_model_state_dict,
        fully_shard_model,
        save_dcp_checkpoint,
    )

    with pytest.raises(ValueError, match="already wrapped by DistributedDataParallel"):
        fully_shard_model(DistributedDataParallel(_model()))
    model = fully_shard_model(_model())
    with pytest.raises(ValueError, match="already applied"):
        fully_shard_model(model)
    assert type(next(model.parameters())).__name__ == "DTensor"
    optimizer = _optimizer(model)
    _train(model, optimizer, range(3), rank, world)
    save_dcp_checkpoint(folder / "ck", model, optimizer, {"step": 3})
    assert (folder / "ck" / ".metadata").is_file()
    assert not list(folder.glob("*.tmp*"))  # renamed into place
    _train(model, optimizer, range(3, 6), rank, world)
    weights = full_model_state_dict(model)
    if rank == 0:
        torch.save(weights, folder / f"uninterrupted-{world}.pt")
    _nonfinite_save_is_refused_on_every_rank(rank, model, optimizer, folder)


def _nonfinite_save_is_refused_on_every_rank(rank, model, optimizer, folder):
    """A NaN in rank 1's shard only: both ranks raise the same error and nothing is written."""
    from gnlorp_dist.checkpoint.dcp import save_dcp_training_checkpoint  # noqa: PLC0415
    from gnlorp_dist.distributed import (  # noqa: PLC0415
        DistributedContext,
        ProcessGroupCommunicator,
    )

    context = DistributedContext(
        rank=rank, world_size=2, local_rank=rank, communicator=ProcessGroupCommunicator()
    )
    if rank == 1:
        with torch.no_grad():
            next(model.parameters()).to_local()[0, 0] = float("nan")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ValueError, match="refusing to write the checkpoint of step 7"):
        save_dcp_training_checkpoint(
            folder / "cli", step=7, model=model, optimizer=optimizer, scheduler=scheduler,
            data_state={}, run_config={}, context=context,
        )  # fmt: skip
    assert not (folder / "cli" / "checkpoints").exists()


def _load_then_continue(rank, world, folder):
    from gnlorp_dist.distributed import (  # noqa: PLC0415
        full_model_state_dict,
        fully_shard_model,
        load_dcp_checkpoint,
    )

    model = fully_shard_model(_model())
    optimizer = _optimizer(model)
    extra = load_dcp_checkpoint(folder / "ck", model, optimizer)
    _train(model, optimizer, range(extra["step"], 6), rank, world)
    weights = full_model_state_dict(model)
    if rank == 0:
        torch.save(weights, folder / f"resumed-{world}.pt")


def test_dcp_checkpoint_of_two_ranks_resumes_on_three_like_the_uninterrupted_run(tmp_path):
    run_ranks(2, _save_then_continue, tmp_path)
    run_ranks(3, _load_then_continue, tmp_path)
    reference = torch.load(tmp_path / "uninterrupted-2.pt")
    resumed = torch.load(tmp_path / "resumed-3.pt")
    assert reference.keys() == resumed.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------- gnlorp-train --fsdp


def _train_args(config, out, batch_size, *extra):
    return [
        "--fsdp", "--optimizer", OPTIMIZER, "--model-config", config, "--seq-len", "32",
        "--batch-size", str(batch_size), "--max-steps", "6", "--save-every", "2",
        "--eval-batches", "1", "--output-dir", str(out), "--no-progress", "--log-every", "1",
        *extra,
    ]  # fmt: skip


def _run(command, env, timeout=300):
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def _torchrun(nproc):
    return [
        str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(setting):
    """2 ranks x 3 sequences, 6 steps, checkpoints at 2, 4, 6."""
    root, config, env = setting
    out = root / "fsdp-2"
    command = [
        *_torchrun(2), "-m", "gnlorp_dist.training.run", "--world-size", "2",
        *_train_args(config, out, 3),
    ]  # fmt: skip
    code, output = _run(command, env)
    assert code == 0, output
    return out, output


def test_fsdp_trains_on_two_ranks_and_its_loss_falls(uninterrupted):
    out, output = uninterrupted
    assert "distributed: 2 processes (fsdp2)" in output
    assert len(re.findall(r"step +6/6 \| loss", output)) == 1  # rank 0 logs alone
    losses = [float(x) for x in re.findall(r"step +\d+/6 \| loss ([-\d.naif]+)", output)]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", output).groups())
    assert last < first
    step4 = out / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in step4.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (step4 / "manifest.json").is_file() and not (step4 / "model.safetensors").exists()
    assert (out / "final" / "model.safetensors").is_file()
    assert "merged model reloads with transformers" in output


@pytest.mark.parametrize(("nproc", "batch_size"), [(3, 2), (1, 6)])
def test_the_step_4_checkpoint_resumes_on_another_world_size_like_the_uninterrupted_run(
    setting,
    uninterrupted,
    nproc,
    batch_size,
):
    root, config, env = setting
    reference, _ = uninterrupted
    out = root / f"fsdp-resumed-{nproc}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        reference / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004"
    )
    launcher = [*_torchrun(nproc), "-m"] if nproc > 1 else [sys.executable, "-m"]
    command = [
        *launcher, "gnlorp_dist.training.run", "--world-size", str(nproc),
        *_train_args(config, out, batch_size),
    ]  # fmt: skip
    code, output = _run(command, env)
    assert code == 0, output
    assert "(step 4)" in output and "done: 2 steps this run, 6 in total" in output
    if nproc > 1:
        assert f"distributed: {nproc} processes (fsdp2)" in output
    step6 = out / "checkpoints" / "step-00000006"
    assert len(list(step6.glob("*.distcp"))) == nproc
    ours = load_file(out / "final" / "model.safetensors")
    theirs = load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------- Accelerate, fsdp_version 2


def test_accelerate_fsdp2_example_on_two_processes_resumes_on_one_and_lets_accelerate_shard(
    setting,
):
    root, _, env = setting
    example = str(ROOT / "examples" / "accelerate_fsdp2_train.py")
    env = dict(env, PYTHONPATH=str(ROOT))
    two, one = root / "acc-fsdp2-2", root / "acc-fsdp2-1"
    common = ["--cpu-fsdp", "--optimizer", OPTIMIZER, "--steps", "8", "--save-at", "4"]
    code, output = _run(
        [*_torchrun(2), example, *common, "--world-size", "2", "--out", str(two)], env
    )
    assert code == 0, output
    assert "engine FSDP fsdp2 | world 2" in output and "step 8/8" in output
    assert (two / "state-4" / "optimizer_0" / ".metadata").is_file()
    command = [
        *_torchrun(1), example, *common, "--world-size", "1", "--out", str(one),
        "--resume", str(two / "state-4"),
    ]  # fmt: skip
    code, output = _run(command, env)
    assert code == 0, output
    assert "engine FSDP fsdp2 | world 1" in output and "step 5/8" in output
    reference, resumed = torch.load(two / "weights.pt"), torch.load(one / "weights.pt")
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=RTOL, atol=ATOL)
    assert (two / "final" / "model.safetensors").is_file()
    # Accelerate's own recipe: it shards the model and swaps the optimizer's parameters.
    theirs = root / "acc-fsdp2-theirs"
    command = [
        *_torchrun(2), example, *common, "--world-size", "2", "--out", str(theirs),
        "--let-accelerate-shard",
    ]  # fmt: skip
    code, output = _run(command, env)
    assert code == 0, output
    assert "engine FSDP fsdp2 | world 2" in output and "step 8/8" in output
    resumed = torch.load(theirs / "weights.pt")
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=RTOL, atol=ATOL)
