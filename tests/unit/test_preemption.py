"""Preemption: SIGTERM, SIGUSR1 and SIGINT make gnlorp-train finish the step under way, write a
verified checkpoint and exit 75 (EXIT_PREEMPTED); on 2 ranks a signal that reaches one rank
stops both at the same step. Each stopped run resumes and ends bitwise where the uninterrupted
run ends. The signal step is drawn at random (named in every assertion)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gnlorp_dist.checkpoint.manifest import verify_manifest
from gnlorp_dist.training.config import config_from_args
from gnlorp_dist.training.preemption import EXIT_PREEMPTED, StopSignals, StopVote, stop_signals
from gnlorp_dist.training.run import main, train
from tests.tiny_llama import tiny_args

pytestmark = pytest.mark.usefixtures("offline_shared_cache")

EXTRA = ("--max-steps", "8", "--save-every", "4", "--keep-checkpoints", "0",
         "--update-proj-gap", "3", "--warmup-steps", "2", "--seed", "3")  # fmt: skip
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
# Runs gnlorp-train with the signal sent to this process as step GNLORP_TEST_SIGNAL's work
# begins (inside the step: its batch is not drawn yet), on rank GNLORP_TEST_SIGNAL_RANK only.
SCRIPT = """
import os, signal, sys
from gnlorp_dist.training import run
name, _, at = os.environ["GNLORP_TEST_SIGNAL"].partition("@")
take_step = run._take_step
def signalled(r, optimizer, step):
    if step == int(at) and os.environ.get("RANK", "0") == os.environ["GNLORP_TEST_SIGNAL_RANK"]:
        os.kill(os.getpid(), getattr(signal, name))
    return take_step(r, optimizer, step)
run._take_step = signalled
sys.exit(run.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_weights(reference: Path, resumed: Path, why: str) -> None:
    ref_w, new_w = (
        load_file(reference / "model.safetensors"),
        load_file(resumed / "model.safetensors"),
    )
    assert ref_w.keys() == new_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], new_w[name]), (why, name)
    ref_state = json.loads((reference / "trainer_state.json").read_text())
    new_state = json.loads((resumed / "trainer_state.json").read_text())
    assert ref_state["data_state"] == new_state["data_state"], why


def _signalled(prefix: list[str], script_dir: Path, args: list[str], signal_at: str, rank=0):
    """``prefix script args`` with ``signal_at`` (``NAME@STEP``) sent to rank ``rank``."""
    script = script_dir / "signal_at_step.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, GNLORP_TEST_SIGNAL=signal_at, GNLORP_TEST_SIGNAL_RANK=str(rank))
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    started = time.perf_counter()
    command = [*prefix, str(script), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return proc, time.perf_counter() - started


def _check_stop(out: Path, proc, stop_step: int, why: str, code=EXIT_PREEMPTED) -> Path:
    """The stopped run's exit, its checkpoint at ``stop_step`` (verified), no later one."""
    assert proc.returncode == code, (why, proc.returncode, proc.stderr[-3000:])
    assert f"stopped by a signal after step {stop_step}" in proc.stderr, (why, proc.stderr[-3000:])
    folder = out / "checkpoints" / f"step-{stop_step:08d}"
    assert verify_manifest(folder) is not None, why  # every file's size and sha256 match
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == stop_step
    later = [p.name for p in (out / "checkpoints").glob("step-*") if p.name > folder.name]
    assert not later and not (out / "final").exists(), (why, later)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("reference")
    train(config_from_args(tiny_args(tiny_config, out, *EXTRA)))
    return out / "checkpoints" / "step-00000008"


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_exits_75_and_resumes_bitwise(tmp_path, tiny_config, reference, name):
    """One process: the step under way finishes, its checkpoint is written, exit 75 with one
    line and no traceback (SIGINT: no KeyboardInterrupt); the resume ends bitwise equal."""
    step = random.randint(2, 7)
    why = f"{name} during step {step}"
    out = tmp_path / "run"
    args = tiny_args(tiny_config, out, *EXTRA)
    proc, _ = _signalled([sys.executable], tmp_path, args, f"{name}@{step}")
    _check_stop(out, proc, step, why)
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, why
    assert f"stopping after step {step}: {name} on this rank" in proc.stdout, why
    assert main([*args, "--resume", "auto"]) == 0
    _same_weights(reference, out / "checkpoints" / "step-00000008", why)


def test_sigusr1_on_one_of_two_ranks_stops_both_at_one_step(tmp_path, tiny_config):
    """torchrun, 2 processes: SIGUSR1 reaches rank 1 only, during step k; both ranks stop
    after step k + 1 (the vote is read one step late, so it adds no host sync), the checkpoint
    holds both ranks' shards and verifies, and the resume (a second torchrun job) ends bitwise
    equal to the uninterrupted 2-rank run."""
    step = random.randint(2, 6)
    why = f"SIGUSR1 to rank 1 during step {step}"

    def torchrun() -> list[str]:
        return [
            str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "--max-restarts", "0",
        ]  # fmt: skip

    ref_args = ["--world-size", "2", *tiny_args(tiny_config, tmp_path / "ref", *EXTRA)]
    proc, _ = _signalled(torchrun(), tmp_path, ref_args, "SIGUSR1@0")  # no step 0: no signal
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    args = ["--world-size", "2", *tiny_args(tiny_config, out, *EXTRA)]
    proc, seconds = _signalled(torchrun(), tmp_path, args, f"SIGUSR1@{step}", rank=1)
    print(f"signalled 2-rank torchrun launch: {seconds:.1f} s")
    # torchrun exits 1 for a failed worker; its summary names the worker's 75 (below).
    folder = _check_stop(out, proc, step + 1, why, code=1)
    for rank in (0, 1):  # every rank says where it stopped: the same step
        line = f"rank {rank}: stopped by a signal after step {step + 1}"
        assert line in proc.stderr, (why, proc.stderr[-3000:])
    assert len(list(folder.glob("optimizer-shard-*"))) == 2, why
    assert "exitcode  : 75" in proc.stderr, (why, proc.stderr[-3000:])  # torchrun's summary
    assert proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]  # torchrun's, not ours
    proc, _ = _signalled(torchrun(), tmp_path, [*args, "--resume", "auto"], "SIGUSR1@0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"(step {step + 1})" in proc.stdout, proc.stdout[-2000:]
    _same_weights(tmp_path / "ref" / "checkpoints" / "step-00000008",
                  out / "checkpoints" / "step-00000008", why)  # fmt: skip


def test_the_vote_without_a_signal_and_the_handlers_come_back():
    """One process: no signal, no stop; a signal, a stop; the handlers are restored."""
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals() as stop:
        vote = StopVote(stop, None)
        assert not vote.after_step(last=False)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == ["SIGTERM"] and vote.after_step(last=False)
    assert signal.getsignal(signal.SIGTERM) is before
    assert not StopVote(StopSignals(), None).after_step(last=False)
