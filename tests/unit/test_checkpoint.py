"""Atomic, resumable checkpoints and the merged final model."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from gnlorp_dist.checkpoint import store as ckpt
from gnlorp_dist.checkpoint.merged import save_merged_model
from gnlorp_dist.checkpoint.store import (
    capture_rng_state,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from gnlorp_dist.models import build_model
from gnlorp_dist.nn import WeightNormLinear, apply_weight_norm, merge_weight_norm
from gnlorp_dist.optim import GradNormLoRPAdamW, projected_param_groups
from gnlorp_dist.training.config import RunConfig, config_record, resolve
from gnlorp_dist.training.resume_settings import check_resume_settings
from gnlorp_dist.training.schedule import warmup_cosine_schedule

TINY = LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
    num_attention_heads=2, max_position_embeddings=16, pad_token_id=None,
)  # fmt: skip


def make_run(seed=0):
    model = apply_weight_norm(build_model(TINY, seed=seed))
    groups = projected_param_groups(model, rank=4, update_proj_gap=2, scale=0.25)
    optimizer = GradNormLoRPAdamW(groups, lr=1e-2, weight_decay=0.01)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=2, total_steps=10, min_ratio=0.1)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler):
    ids = torch.randint(0, TINY.vocab_size, (2, 8))  # draws from the (restored) RNG
    optimizer.zero_grad()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    scheduler.step()


def save(out, step_no, run, keep=0):
    model, optimizer, scheduler = run
    return save_checkpoint(
        out, step=step_no, model=model, optimizer=optimizer, scheduler=scheduler,
        data_state={"sampler": {"epoch": 0, "position": step_no}}, run_config={"model": "tiny"},
        keep=keep,
    )  # fmt: skip


def test_round_trip_continues_bitwise(tmp_path):
    torch.manual_seed(0)
    run = make_run()
    for _ in range(3):
        step(*run)
    path = save(tmp_path, 3, run)
    for _ in range(4):  # crosses a subspace refresh (gap 2)
        step(*run)

    torch.manual_seed(999)  # scrambled; the checkpoint restores the RNG
    resumed = make_run(seed=1)  # other init: the checkpoint overwrites it
    state = load_checkpoint(path, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2])
    assert state.step == 3 and state.data_state == {"sampler": {"epoch": 0, "position": 3}}
    for _ in range(4):
        step(*resumed)
    for (name, a), b in zip(run[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), name
    assert run[2].get_last_lr() == resumed[2].get_last_lr()


def test_layout_and_weights_only_loading(tmp_path):
    run = make_run()
    step(*run)
    path = save(tmp_path, 1, run)
    assert path == tmp_path / "checkpoints" / "step-00000001"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "optimizer-shard-00000-of-00001.pt", "scheduler.pt",
         "rng_state.pt", "run_config.json", "trainer_state.json", "manifest.json"]
    )  # fmt: skip
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["all_finite"] is True and manifest["step"] == 1
    assert sorted(manifest["files"]) == sorted(p.name for p in path.iterdir())[1:]  # all but it
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size and len(entry["sha256"]) == 64
    for name in ("optimizer-shard-00000-of-00001.pt", "scheduler.pt", "rng_state.pt"):
        torch.load(path / name, weights_only=True)
    shard = torch.load(path / "optimizer-shard-00000-of-00001.pt", weights_only=True)
    assert any("proj" in e["state"] for e in shard["entries"].values())  # projectors are saved
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["format_version"] == ckpt.FORMAT_VERSION
    assert json.loads((path / "run_config.json").read_text()) == {"model": "tiny"}


def test_crash_mid_write_is_never_picked_up(tmp_path, monkeypatch):
    run = make_run()
    good = save(tmp_path, 2, run)

    real_torch_save = ckpt._torch_save

    def die_after_model_file(obj, path):
        raise KeyboardInterrupt("killed while writing " + path.name)

    monkeypatch.setattr(ckpt, "_torch_save", die_after_model_file)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 4, run)
    leftovers = [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    # A folder with the final name but no trainer_state.json (copied by hand, say) is not complete.
    (tmp_path / "checkpoints" / "step-00000009").mkdir()
    assert complete_checkpoints(tmp_path) == [good]
    assert latest_checkpoint(tmp_path) == good

    monkeypatch.setattr(ckpt, "_torch_save", real_torch_save)
    newer = save(tmp_path, 6, run)
    assert latest_checkpoint(tmp_path) == newer
    assert not any(".tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())


def test_keep_newest_k(tmp_path):
    run = make_run()
    for step_no in range(1, 6):
        save(tmp_path, step_no, run, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    save(tmp_path, 6, run, keep=0)
    assert len(complete_checkpoints(tmp_path)) == 3
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_rng_states_round_trip_through_weights_only_files(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_incompatible_config_names_the_fields():
    saved = config_record(*resolve(RunConfig(optimizer="galore")))
    check_resume_settings(saved, dict(saved, max_steps=9), RunConfig(), "ck", print)
    with pytest.raises(ValueError, match=r"optimizer: checkpoint 'galore', now 'adamw'"):
        check_resume_settings(saved, dict(saved, optimizer="adamw"), RunConfig(), "ck", print)
    shape = dict(saved["llama_config"], hidden_size=32)
    with pytest.raises(
        ValueError, match=r"^checkpoint ck .*\(llama_config.hidden_size: checkpoint 128, now 32"
    ):
        check_resume_settings(saved, dict(saved, llama_config=shape), RunConfig(), "ck", print)


def test_merged_model_reloads_in_stock_transformers_with_the_same_logits(tmp_path):
    model = make_run()[0]
    with torch.no_grad():  # move away from the identity init so the merge matters
        for module in model.modules():
            if isinstance(module, WeightNormLinear):
                module.magnitude.mul_(torch.linspace(0.5, 2.0, module.magnitude.numel()))
    final = save_merged_model(model, tmp_path, merge=merge_weight_norm, info={"step": 0})
    save_merged_model(model, tmp_path, merge=merge_weight_norm)  # replaces it, atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert any(isinstance(m, WeightNormLinear) for m in model.modules())  # training model intact
    reloaded = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    assert not any(isinstance(m, WeightNormLinear) for m in reloaded.modules())
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = reloaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_resume_with_more_steps_takes_the_new_schedules_lr_at_once():
    from gnlorp_dist.training.schedule import sync_lr_to_schedule, warmup_cosine_factor

    param = torch.nn.Parameter(torch.zeros(2))
    old_opt = torch.optim.SGD([param], lr=1.0)
    old = warmup_cosine_schedule(old_opt, warmup_steps=0, total_steps=4, min_ratio=0.1)
    for _ in range(4):
        old_opt.step()
        old.step()
    assert old_opt.param_groups[0]["lr"] == pytest.approx(0.1)  # the end of a 4-step schedule
    new_opt = torch.optim.SGD([param], lr=1.0)
    new = warmup_cosine_schedule(new_opt, warmup_steps=0, total_steps=8, min_ratio=0.1)
    new_opt.load_state_dict(old_opt.state_dict())  # carries lr 0.1 over
    new.load_state_dict(old.state_dict())
    sync_lr_to_schedule(new)
    expected = warmup_cosine_factor(4, 0, 8, 0.1)
    assert new_opt.param_groups[0]["lr"] == pytest.approx(expected) and expected > 0.5
    assert new.get_last_lr() == [pytest.approx(expected)]
