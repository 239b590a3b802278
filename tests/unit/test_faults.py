"""Fault injection through GNLORP_FAULT: a run killed (SIGKILL) at each point of a step or of a
checkpoint write resumes from its last complete checkpoint and ends bitwise where the
uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gnlorp_dist.training.config import config_from_args
from gnlorp_dist.training.faults import ENV_VAR, POINTS, fault_point, parse_fault
from gnlorp_dist.training.run import main, train
from tests.tiny_llama import tiny_args

pytestmark = pytest.mark.usefixtures("offline_shared_cache")

EXTRA = ("--max-steps", "8", "--save-every", "2", "--keep-checkpoints", "0",
         "--update-proj-gap", "3", "--warmup-steps", "2", "--seed", "3", "--bits", "8")  # fmt: skip
# Where each kill lands, and the checkpoint the resumed run must start from.
KILLS = {
    "train.after_step@5": "step-00000004",
    "checkpoint.after_optimizer@6": "step-00000004",
    "checkpoint.after_model@6": "step-00000004",
    "checkpoint.before_rename@6": "step-00000004",
    "checkpoint.after_rename@6": "step-00000006",
}


def test_every_point_is_exercised_and_specs_are_checked(monkeypatch):
    assert {spec.split("@")[0] for spec in KILLS} == set(POINTS)
    assert parse_fault("checkpoint.after_model@6") == ("checkpoint.after_model", 6)
    assert parse_fault("train.after_step") == ("train.after_step", None)
    with pytest.raises(ValueError, match="unknown point 'checkpoint.after_modle'"):
        parse_fault("checkpoint.after_modle")
    with pytest.raises(ValueError, match="must be a number"):
        parse_fault("train.after_step@six")
    monkeypatch.setenv(ENV_VAR, "train.after_step@5")
    fault_point("train.after_step", 4)  # another step: nothing happens
    fault_point("checkpoint.after_model", 5)  # another point: nothing happens


def test_an_unknown_fault_point_is_refused_before_the_first_step(
    tmp_path, tiny_config, capsys, monkeypatch
):
    monkeypatch.setenv(ENV_VAR, "checkpoint.after_modle@2")
    with pytest.raises(SystemExit) as refused:
        main(tiny_args(tiny_config, tmp_path))
    assert refused.value.code == 2
    captured = capsys.readouterr()
    assert "unknown point 'checkpoint.after_modle'" in captured.err
    assert "step " not in captured.out and not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("reference")
    train(config_from_args(tiny_args(tiny_config, out, *EXTRA)))
    return out / "checkpoints" / "step-00000008"


@pytest.mark.parametrize("spec", list(KILLS))
def test_a_kill_resumes_bitwise_from_the_last_complete_checkpoint(
    tmp_path, tiny_config, reference, spec, capsys
):
    out = tmp_path / "killed"
    args = tiny_args(tiny_config, out, *EXTRA)
    proc = subprocess.run(
        [sys.executable, "-m", "gnlorp_dist.training.run", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, ENV_VAR: spec},
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / ".lock").exists()  # a killed run leaves its lock behind

    with pytest.warns(UserWarning):  # the dead run's lock is taken over, with a warning
        assert main([*args, "--resume", "auto"]) == 0
    assert f"resumed from {out / 'checkpoints' / KILLS[spec]}" in capsys.readouterr().out
    resumed = out / "checkpoints" / "step-00000008"
    ref_w, new_w = (
        load_file(reference / "model.safetensors"),
        load_file(resumed / "model.safetensors"),
    )
    assert ref_w.keys() == new_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], new_w[name]), (spec, name)
    ref_state = json.loads((reference / "trainer_state.json").read_text())
    new_state = json.loads((resumed / "trainer_state.json").read_text())
    assert ref_state["data_state"] == new_state["data_state"]
    assert not any(".tmp" in p.name for p in (out / "checkpoints").iterdir())
