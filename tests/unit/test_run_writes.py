"""What a run writes at its end, and the disk check that counts exactly that.

- The merged model is streamed module by module (:mod:`gnlorp_dist.checkpoint.merged`): the
  same files, byte for byte, as ``save_merged_model`` (deep copy, merge, ``save_pretrained``),
  with at most one module's tensors alive (measured: peak bytes gathered at once).
- The disk check counts one checkpoint only when the run trains, plus the merged model; a
  caller of ``prepare()`` with its own loop (the GPU check's 7B recipe) is not refused.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from gnlorp_dist import apply_weight_norm
from gnlorp_dist.checkpoint.merged import save_merged_model, save_merged_streamed
from gnlorp_dist.nn import merge_weight_norm
from gnlorp_dist.training import preflight
from gnlorp_dist.training.config import config_from_args
from gnlorp_dist.training.run import main
from gnlorp_dist.training.setup import check_space_for_run, prepare
from tests.tiny_llama import small_llama, tiny_args

pytestmark = pytest.mark.usefixtures("offline_shared_cache")


def _trained_looking(dtype, lora_rank=None):
    torch.manual_seed(4)
    model = small_llama(vocab_size=96, hidden_size=32, intermediate_size=72, num_hidden_layers=2)
    model = apply_weight_norm(model, lora_rank=lora_rank).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return model


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("dtype", "lora_rank"), [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 4)]
)
def test_streamed_merged_model_is_byte_for_byte_save_merged_model(tmp_path, dtype, lora_rank):
    model = _trained_looking(dtype, lora_rank)
    info = {"step": 3}
    old = save_merged_model(model, tmp_path / "old", merge=merge_weight_norm, info=info)
    new = save_merged_streamed(model, tmp_path / "new", info=info)
    assert _files(new) == _files(old)


def test_streaming_holds_one_module_at_a_time(tmp_path):
    """Every tensor comes from ``gather``; the bytes it has handed out and that are still
    alive peak at one module's (the embedding), far below the model."""
    import weakref  # noqa: PLC0415

    model = _trained_looking(torch.float32)
    live: list[weakref.ref] = []
    peak = [0]

    def gather(param):
        whole = param.detach().clone()  # a gathered copy, as under ZeRO or FSDP2
        live[:] = [ref for ref in live if ref() is not None] + [weakref.ref(whole)]
        peak[0] = max(peak[0], sum(t.nbytes for ref in live if (t := ref()) is not None))
        return whole

    save_merged_streamed(model, tmp_path, gather=gather)
    model_bytes = sum(p.nbytes for p in model.parameters())
    largest_module = max(
        sum(p.nbytes for p in m.parameters(recurse=False)) for m in model.modules()
    )
    assert peak[0] == largest_module < model_bytes / 4


def test_refusal_counts_the_checkpoint_and_the_merged_model(
    tmp_path, tiny_config, capsys, monkeypatch
):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tiny_config, tmp_path / "run"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "one checkpoint needs about" in err and "and the merged model about" in err
    assert not (tmp_path / "run" / "final").exists()


def test_prepare_alone_writes_nothing_and_is_not_refused(tmp_path, tiny_config, monkeypatch):
    """The GPU check's in-process 7B run: prepare() and its own steps, save_every 0, no final
    save. With 1 MB free it still starts; gnlorp-train on the same Run is refused."""
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    config = config_from_args(tiny_args(tiny_config, tmp_path / "run", "--save-every", "0"))
    run = prepare(config)
    assert run.write_bytes["checkpoint"] > 0 and run.write_bytes["merged"] > 0
    with pytest.raises(preflight.NotEnoughSpace, match="one checkpoint needs about"):
        check_space_for_run(run)


def test_writes_follow_what_the_run_does():
    both = preflight.run_writes(checkpoint_bytes=10, merged_bytes=5, start_step=0, max_steps=3)
    assert both == {"one checkpoint": 10, "the merged model": 5}
    done = preflight.run_writes(checkpoint_bytes=10, merged_bytes=5, start_step=3, max_steps=3)
    assert done == {"the merged model": 5}  # already at --max-steps: no checkpoint is saved


def test_free_space_check_refuses_and_passes_on_the_numbers(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(0, 0, 100 << 20))
    preflight.check_free_space(tmp_path, {"one checkpoint": 40 << 20, "the merged model": 30 << 20})
    preflight.check_free_space(tmp_path, {})  # nothing to write
    with pytest.raises(preflight.NotEnoughSpace, match=r"100\.0 MiB free but the merged model"):
        preflight.check_free_space(tmp_path, {"the merged model": 90 << 20})


def test_merged_model_estimate_is_the_written_file(tmp_path, tiny_config):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_config, out)) == 0
    config = prepare(config_from_args(tiny_args(tiny_config, tmp_path / "other")))
    written = (out / "final" / "model.safetensors").stat().st_size
    assert 0.99 * written < config.write_bytes["merged"] <= written
