"""A full disk during a save, too little room for the next save, what fills the output folder,
and the partial folders killed saves leave (checkpoints' and the final model's)."""

import errno
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import save_file

from gnlorp_dist.checkpoint import store as ckpt
from gnlorp_dist.checkpoint.merged import fresh_final_tmp, save_merged_model
from gnlorp_dist.checkpoint.space import DiskFullError, is_disk_full
from gnlorp_dist.checkpoint.store import check_checkpoint
from gnlorp_dist.training.run import main
from tests.tiny_llama import tiny_args

from .test_checkpoint import make_run

pytestmark = pytest.mark.usefixtures("offline_shared_cache")

SAVE_EACH_STEP = ("--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "0")


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _disk_full_in_torch_save():
    """What torch.save raises when the disk fills: its RuntimeError, raised while handling
    the file's OSError (measured with a file object whose write raises ENOSPC)."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:  # the OSError stays the context, as in torch
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904


class _FullFile(io.RawIOBase):
    """A file on a disk that fills up after its first kilobyte."""

    written = 0

    def writable(self):
        return True

    def write(self, data):
        self.written += len(data)
        if self.written > 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)


def test_a_full_disk_is_recognised_through_torch_and_safetensors(tmp_path):
    with pytest.raises(RuntimeError) as from_torch:
        torch.save({"a": torch.zeros(10_000)}, _FullFile())
    assert not isinstance(from_torch.value, OSError) and is_disk_full(from_torch.value)
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert is_disk_full(rust)
    with pytest.raises(Exception) as other:
        save_file({"a": torch.zeros(2)}, str(tmp_path / "missing" / "x.safetensors"))
    assert not is_disk_full(other.value)


def test_a_full_disk_mid_save_keeps_the_last_checkpoint_and_exits_2(
    tmp_path, tiny_config, capsys, monkeypatch
):
    real = ckpt._torch_save

    def fill_up(obj, path):
        if path.parent.name.startswith("step-00000002.tmp") and path.name == ckpt.RNG_FILE:
            _disk_full_in_torch_save()
        real(obj, path)

    monkeypatch.setattr(ckpt, "_torch_save", fill_up)
    with pytest.raises(SystemExit) as stopped:
        main(tiny_args(tiny_config, tmp_path, *SAVE_EACH_STEP))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "disk full while writing the checkpoint of step 2" in err
    kept = tmp_path / "checkpoints" / "step-00000001"
    assert f"the last complete checkpoint, {kept}, is kept" in err and "free there now" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]
    assert check_checkpoint(kept)["step"] == 1


def test_too_little_room_refuses_the_save_and_a_resume_names_what_fills_the_folder(
    tmp_path, tiny_config, capsys, monkeypatch
):
    real = shutil.disk_usage
    first = tmp_path / "checkpoints" / "step-00000001"

    def filled_after_step_1(path):
        usage = real(path)
        return usage._replace(free=1 << 20) if first.exists() else usage

    monkeypatch.setattr(shutil, "disk_usage", filled_after_step_1)
    with pytest.raises(SystemExit) as stopped:
        main(tiny_args(tiny_config, tmp_path, *SAVE_EACH_STEP))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "has 1.0 MiB free but the checkpoint of step 2 needs about" in err
    assert "Nothing of step 2 was written" in err and "checkpoints/step-00000001 (" in err
    assert sorted(p.name for p in first.parent.iterdir()) == ["step-00000001"]

    # A killed save's partial folders: removed when the next run starts, and logged.
    partial = first.parent / "step-00000002.tmp-job"
    partial.mkdir()
    (partial / "optimizer-shard-00000-of-00002.pt").write_bytes(b"\0" * (2 << 20))
    final_tmp = tmp_path / f"final.tmp-{_dead_pid()}"
    final_tmp.mkdir()
    with pytest.raises(SystemExit) as stopped:
        main(tiny_args(tiny_config, tmp_path, *SAVE_EACH_STEP))
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert "removed the partial folders of interrupted saves" in captured.out
    assert "step-00000002.tmp-job (2.0 MiB)" in captured.out and final_tmp.name in captured.out
    assert not partial.exists() and not final_tmp.exists()
    assert "What fills" in captured.err and "checkpoints/step-00000001 (" in captured.err


def test_a_killed_final_save_leaves_nothing_behind(tmp_path):
    dead = _dead_pid()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f"final.tmp-{dead}", f"final.old-tmp-{dead}", f"final.tmp-{other.pid}"]
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"partial")
        final, tmp = fresh_final_tmp(tmp_path)
        assert tmp.is_dir() and not any(tmp.iterdir())
        left = sorted(p.name for p in tmp_path.iterdir() if p != tmp)
        assert left == [f"final.tmp-{other.pid}"]  # a live writer's folder stays
    finally:
        other.kill()
        other.wait()


def test_a_full_disk_during_the_final_model_removes_its_folder(tmp_path, monkeypatch):
    model = make_run()[0]

    def fill_up(self, folder, **kwargs):
        (folder_path := type(tmp_path)(folder)).mkdir(exist_ok=True)
        (folder_path / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fill_up)
    with pytest.raises(DiskFullError, match="disk full while writing the final model"):
        save_merged_model(model, tmp_path)
    assert list(tmp_path.iterdir()) == []
