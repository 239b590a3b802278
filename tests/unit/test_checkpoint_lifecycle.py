"""Checkpoint lifecycle: the output folder's lock, branches, manifests, fallback on corruption,
the finite-tensor guard, and DeepSpeed's ``latest`` pointer ignored."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from gnlorp_dist.checkpoint import store as ckpt
from gnlorp_dist.checkpoint.branches import step_dir_name
from gnlorp_dist.checkpoint.manifest import (
    LOCK_FILE,
    CheckpointWarning,
    acquire_lock,
    write_manifest,
)
from gnlorp_dist.checkpoint.store import (
    all_checkpoints,
    begin_branch_if_needed,
    check_checkpoint,
    complete_checkpoints,
    current_branch,
    load_checkpoint,
    select_checkpoint,
)
from gnlorp_dist.integrations.deepspeed.checkpoint import CLIENT_STATE_FILE, LAYOUT_FILE
from gnlorp_dist.training import deepspeed_step as ds_training
from gnlorp_dist.training.config import config_from_args
from gnlorp_dist.training.run import main, train
from tests.tiny_llama import tiny_args

from .test_checkpoint import make_run, save, step

# ------------------------------------------------------------------------------------- lock


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / LOCK_FILE
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": 0}))
        with pytest.raises(
            ValueError, match=rf"in use by another run \(pid {other.pid} .*another --output-dir"
        ):
            acquire_lock(tmp_path)
    finally:
        other.kill()
        other.wait()
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": 0}))
    with pytest.warns(CheckpointWarning, match="stale lock"):
        assert acquire_lock(tmp_path) == lock
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert acquire_lock(tmp_path) == lock  # this process's own lock: kept
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(ValueError, match="host elsewhere"):
        acquire_lock(tmp_path)


def test_cli_refuses_an_output_dir_in_use(tmp_path, tiny_config, capsys, offline_shared_cache):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(
            json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": 0})
        )
        with pytest.raises(SystemExit):
            main(tiny_args(tiny_config, tmp_path))
    finally:
        other.kill()
        other.wait()
    assert f"pid {other.pid}" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------- branches


def _tiny(tiny_config, out, *extra):
    return config_from_args(
        tiny_args(tiny_config, out, "--save-every", "2", "--keep-checkpoints", "2", *extra)
    )


def test_resuming_an_older_checkpoint_starts_a_branch_pruning_keeps_apart(
    tmp_path, tiny_config, offline_shared_cache
):
    out = tmp_path / "run"
    train(_tiny(tiny_config, out, "--max-steps", "6"))
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000004", "step-00000006"]
    old = out / "checkpoints" / "step-00000004"
    # Resume the older checkpoint into the same folder, to step 10: a new branch.
    result = train(_tiny(tiny_config, out, "--max-steps", "10", "--resume", str(old)))
    assert result.final_step == 10
    branch = current_branch(out)
    assert branch["branch"] != "main" and branch["parent"] == str(old.resolve())
    names = sorted(p.name for _s, _b, p in all_checkpoints(out))
    suffix = branch["branch"]
    # The old branch keeps steps 4 and 6 (its step 6 is not pruned by the new branch's steps);
    # the new branch keeps its newest 2.
    assert names == [
        "step-00000004", "step-00000006", f"step-00000008-{suffix}", f"step-00000010-{suffix}",
    ]  # fmt: skip
    state = json.loads(
        (out / "checkpoints" / f"step-00000010-{suffix}" / "trainer_state.json").read_text()
    )
    assert state["branch"] == suffix and state["step"] == 10
    # --resume auto continues the current branch (not the old one's step 6).
    assert select_checkpoint(out).name == f"step-00000010-{suffix}"
    again = train(_tiny(tiny_config, out, "--max-steps", "12", "--resume", "auto"))
    assert again.final_step == 12 and current_branch(out)["branch"] == suffix
    assert (out / "checkpoints" / f"step-00000012-{suffix}").is_dir()
    assert (out / "checkpoints" / "step-00000006").is_dir()


def test_branch_rules(tmp_path):
    run = make_run()
    first = save(tmp_path, 2, run)
    newest = save(tmp_path, 4, run)
    assert begin_branch_if_needed(tmp_path, newest) is None  # the head: the branch continues
    branch = begin_branch_if_needed(tmp_path, first)
    assert branch and current_branch(tmp_path)["branch"] == branch
    assert complete_checkpoints(tmp_path) == []
    assert select_checkpoint(tmp_path) == first  # an empty branch resumes where it started
    assert begin_branch_if_needed(tmp_path, first) is None  # ... and stays the same branch
    mine = save(tmp_path, 3, run, keep=1)
    assert mine.name == f"step-00000003-{branch}"
    assert first.is_dir() and newest.is_dir()  # pruning never touches another branch
    assert select_checkpoint(tmp_path) == mine


# ------------------------------------------------------------------------ corruption, fallback


def _two_checkpoints(tmp_path):
    run = make_run()
    step(*run)
    older = save(tmp_path, 1, run)
    step(*run)
    return run, older, save(tmp_path, 2, run)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: _truncate(c / "model.safetensors"),
        lambda c: _truncate(c / "optimizer-shard-00000-of-00001.pt"),
        lambda c: (c / "trainer_state.json").write_text("{not json"),
        lambda c: (c / "manifest.json").write_text("{not json"),
        lambda c: (c / "rng_state.pt").unlink(),
    ],
    ids=["model", "optimizer-shard", "trainer-state", "manifest", "missing-file"],
)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    _run, older, newest = _two_checkpoints(tmp_path)
    damage(newest)
    with pytest.warns(CheckpointWarning, match=rf"skipping checkpoint {newest}: .*{newest}"):
        assert select_checkpoint(tmp_path) == older
    with pytest.raises(ValueError, match=str(newest)):
        check_checkpoint(newest)
    resumed = make_run(seed=1)
    with pytest.raises(ValueError, match=str(newest)):
        load_checkpoint(newest, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2])
    damage(older)
    with pytest.raises(ValueError, match=r"no checkpoint in .* verifies.*another --output-dir"):
        with pytest.warns(CheckpointWarning):
            select_checkpoint(tmp_path)


def test_an_edited_step_count_is_detected(tmp_path):
    _run, older, newest = _two_checkpoints(tmp_path)
    path = newest / "trainer_state.json"
    state = json.loads(path.read_text())
    state["step"] = 9  # same size: only the checksum tells
    path.write_text(json.dumps(state, indent=2, sort_keys=True))
    with pytest.raises(ValueError, match=rf"{path} does not match its sha256"):
        check_checkpoint(newest)
    with pytest.warns(CheckpointWarning, match="trainer_state.json"):
        assert select_checkpoint(tmp_path) == older


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ValueError, match="stuff.*not a complete gnlorp_dist checkpoint"):
        check_checkpoint(tmp_path / "stuff")


def test_a_format_1_checkpoint_without_manifest_loads_with_a_warning(tmp_path):
    run, _older, newest = _two_checkpoints(tmp_path)
    (newest / "manifest.json").unlink()
    path = newest / "trainer_state.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), format_version=1)))
    resumed = make_run(seed=1)
    with pytest.warns(CheckpointWarning, match="unverified"):
        state = load_checkpoint(
            newest, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2]
        )
    assert state.step == 2
    for a, b in zip(run[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    # A format-2 checkpoint without its manifest is an unfinished or foreign one.
    path.write_text(json.dumps(dict(json.loads(path.read_text()), format_version=2)))
    with pytest.raises(ValueError, match="no manifest.json"):
        check_checkpoint(newest)


# ------------------------------------------------------------------------------- finiteness


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_a_nan_is_never_written_into_a_checkpoint(tmp_path, where, caplog):
    run, older, newest = _two_checkpoints(tmp_path)
    model, optimizer, _scheduler = run
    with torch.no_grad():
        if where == "model":
            next(model.parameters())[0].fill_(float("nan"))
        else:
            state = next(s for s in optimizer.state.values() if "exp_avg" in s)
            state["exp_avg"].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match="refusing to write the checkpoint of step 3: non-finite"):
        save(tmp_path, 3, run)
    assert "non-finite" in caplog.text
    assert [p for _s, _b, p in all_checkpoints(tmp_path)] == [older, newest]
    assert not any(".tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())
    assert json.loads((newest / "manifest.json").read_text())["all_finite"] is True


def test_a_manifest_not_recording_finite_tensors_is_skipped(tmp_path):
    _run, older, newest = _two_checkpoints(tmp_path)
    path = newest / "manifest.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), all_finite=False)))
    with pytest.warns(CheckpointWarning, match=f"{path} does not record every tensor finite"):
        assert select_checkpoint(tmp_path) == older


# -------------------------------------------------------------------------------- DeepSpeed


def _ds_tag(root, step_no, *, ours=True, branch="main"):
    folder = root / step_dir_name(step_no, branch)
    folder.mkdir(parents=True)
    torch.save({"module": {}}, folder / "mp_rank_00_model_states.pt")  # DeepSpeed's own file
    if ours:
        torch.save({"step": step_no}, folder / CLIENT_STATE_FILE)
        (folder / LAYOUT_FILE).write_text(json.dumps({"world_size": 1, "zero_stage": 2}))
        write_manifest(folder, step=step_no)
    return folder


def test_deepspeed_latest_written_before_our_files_falls_back(tmp_path):
    root = tmp_path / ds_training.CHECKPOINT_DIR
    complete = _ds_tag(root, 2)
    killed = _ds_tag(root, 4, ours=False)  # killed after DeepSpeed's save, before ours
    (root / "latest").write_text(killed.name)
    with pytest.warns(CheckpointWarning, match=rf"skipping DeepSpeed checkpoint {killed}"):
        folder, state = ds_training.select_tag(tmp_path)
    assert folder == complete and state == {"step": 2}
    _truncate(complete / CLIENT_STATE_FILE)
    with pytest.raises(ValueError, match="no DeepSpeed checkpoint in .* verifies"):
        with pytest.warns(CheckpointWarning):
            ds_training.select_tag(tmp_path)


def test_kill_during_write_leaves_the_verified_checkpoints(tmp_path, monkeypatch):
    run, older, newest = _two_checkpoints(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while hashing")

    monkeypatch.setattr(ckpt, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 3, run)
    assert select_checkpoint(tmp_path) == newest


def test_deepspeed_branches(tmp_path):
    from gnlorp_dist.checkpoint.branches import begin_branch_if_needed as begin  # noqa: PLC0415

    root = tmp_path / ds_training.CHECKPOINT_DIR
    first = _ds_tag(root, 2)
    killed = _ds_tag(root, 4, ours=False)
    # Resuming step 2 after a kill mid-save of step 4: the same branch continues.
    assert begin(root, first, ds_training._is_finished) is None
    killed.rename(root / "step-00000006")
    _ds_tag(root, 4)  # a finished newer checkpoint: resuming step 2 now starts a branch
    branch = begin(root, first, ds_training._is_finished)
    assert branch is not None
    assert ds_training.tag_folders(tmp_path) == [first]  # empty branch: where it started
    mine = _ds_tag(root, 3, branch=branch)
    assert ds_training.tag_folders(tmp_path) == [mine, first]
    assert ds_training.select_tag(tmp_path) == (mine, {"step": 3})
