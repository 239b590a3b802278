"""Validation before work: the output folder, DeepSpeed keys, data decoding and optimizer state
shapes are refused before the first training step, each naming the culprit and the fix."""

import builtins
import collections
import json
from pathlib import Path

import pytest
import torch

from gnlorp_dist.data.corpus import local_documents
from gnlorp_dist.finetune.data import read_table
from gnlorp_dist.integrations.deepspeed.config import (
    check_deepspeed_config,
    known_top_level_keys,
    known_zero_keys,
)
from gnlorp_dist.optim import GradNormLoRPAdamW, projected_param_groups
from gnlorp_dist.training import preflight
from gnlorp_dist.training.config import config_from_args, resolve
from gnlorp_dist.training.run import main
from gnlorp_dist.training.setup import build_optimizer, build_training_model
from tests.tiny_llama import small_llama, tiny_args

pytestmark = pytest.mark.usefixtures("offline_shared_cache")


def _refused_before_any_step(argv, capsys):
    """gnlorp-train with ``argv`` exits 2 without training: its stderr (the error)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert "step " not in printed.out and "loss" not in printed.out, printed.out
    return printed.err


# ------------------------------------------------------------------------------- output dir


def test_output_dir_that_is_a_file_is_refused_before_any_step(tmp_path, tiny_config, capsys):
    out = tmp_path / "run"
    out.write_text("not a folder")
    err = _refused_before_any_step(tiny_args(tiny_config, out), capsys)
    assert f"--output-dir '{out}' is a file" in err
    assert out.read_text() == "not a folder"


def test_output_dir_under_a_file_is_refused_before_any_step(tmp_path, tiny_config, capsys):
    parent = tmp_path / "parent"
    parent.write_text("a file, so nothing can be created under it")
    out = parent / "run"
    err = _refused_before_any_step(tiny_args(tiny_config, out), capsys)
    assert f"--output-dir '{out}' cannot be created" in err and "a parent is a file" in err


def test_unwritable_output_dir_is_refused_before_any_step(
    tmp_path, tiny_config, capsys, monkeypatch
):
    # Tests run as root, which writes through any chmod: refuse the probe file as a read-only
    # file system would, and check that only the probe (no checkpoint) was ever attempted.
    out = tmp_path / "run"
    attempts = []

    def read_only_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(out)) and any(flag in mode for flag in "wax+"):
            attempts.append(str(file))
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(preflight, "open", read_only_open, raising=False)
    err = _refused_before_any_step(tiny_args(tiny_config, out), capsys)
    assert f"--output-dir '{out}' is not writable (Permission denied)" in err
    assert "another --output-dir" in err
    assert len(attempts) == 1 and ".gnlorp-write-probe-" in attempts[0]
    assert list(out.iterdir()) == []  # no checkpoints folder, no probe left behind


def test_too_little_space_is_refused_before_any_step(tmp_path, tiny_config, capsys, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    out = tmp_path / "run"
    err = _refused_before_any_step(tiny_args(tiny_config, out), capsys)
    assert f"--output-dir '{out}' has 976.6 KiB free but one checkpoint needs about" in err
    assert "larger disk" in err
    assert not (out / "checkpoints").exists()


def test_writable_folder_passes_and_keeps_nothing(tmp_path):
    out = tmp_path / "a" / "b"
    assert preflight.check_output_dir(out, 1000) == out
    assert list(out.iterdir()) == []


def test_checkpoint_estimate_is_close_to_a_real_checkpoint(tmp_path, tiny_config):
    for extra, out in (
        ((), tmp_path / "fp32"),
        (("--bits", "8"), tmp_path / "8bit"),
        (("--bits", "8", "--proj-bits", "4"), tmp_path / "8bit-int4-bases"),
    ):
        assert main(tiny_args(tiny_config, out, "--max-steps", "1", *extra)) == 0
        folder = out / "checkpoints" / "step-00000001"
        actual = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        config, llama = resolve(config_from_args(tiny_args(tiny_config, out, *extra)))
        model = build_training_model(config, llama)
        estimate = preflight.checkpoint_bytes_estimate(model, build_optimizer(config, model))
        assert 0.9 * actual < estimate < 1.1 * actual, (extra, estimate, actual)


# --------------------------------------------------------------------------- DeepSpeed keys


@pytest.mark.parametrize(
    ("config", "named", "suggested"),
    [
        ({"zero_optimisation": {"stage": 2}}, "'zero_optimisation'", "'zero_optimization'"),
        ({"train_micro_batch_size": 1}, "'train_micro_batch_size'", None),
        (
            {"zero_optimization": {"stage": 2, "overlap_com": True}},
            "'zero_optimization.overlap_com'",
            "'overlap_comm'",
        ),
        (
            {"zero_optimization": {"stage": 3, "stage3_prefetch_bucketsize": 10}},
            "'zero_optimization.stage3_prefetch_bucketsize'",
            "'stage3_prefetch_bucket_size'",
        ),
        ({"bf16": {"enabled": True}, "no_such_thing_at_all": 1}, "'no_such_thing_at_all'", ""),
    ],
)
def test_unknown_deepspeed_keys_are_refused_with_the_nearest_one(config, named, suggested):
    with pytest.raises(ValueError, match="DeepSpeed does not know") as info:
        check_deepspeed_config(config)
    message = str(info.value)
    assert f"the DeepSpeed config has the key {named}" in message
    if suggested == "":
        assert "did you mean" not in message
    elif suggested is not None:
        assert f"did you mean {suggested}?" in message


def test_known_keys_come_from_deepspeed_itself():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    top = known_top_level_keys()
    for key in ("zero_optimization", "bf16", "train_micro_batch_size_per_gpu", "optimizer"):
        assert key in top
    assert set(DeepSpeedZeroConfig.model_fields) <= known_zero_keys()
    assert "stage3_gather_16bit_weights_on_model_save" in known_zero_keys()  # an alias
    shipped = sorted(Path(__file__).parents[2].joinpath("ds_configs").glob("*.json"))
    assert len(shipped) >= 7
    for path in shipped:
        check_deepspeed_config(path, allow_auto=True)


# ------------------------------------------------------------------------------- data files


def test_non_utf8_text_data_names_the_file(tmp_path, tiny_config, capsys):
    data = tmp_path / "corpus.txt"
    data.write_bytes("first line\nCaf\u00e9 au lait\n".encode("latin-1"))
    out = tmp_path / "run"
    err = _refused_before_any_step(tiny_args(tiny_config, out, "--data", str(data)), capsys)
    assert f"{data} is not UTF-8 text: byte 0xe9 at offset 14 (line 2)" in err
    assert "re-encode it as UTF-8" in err
    assert not (out / "checkpoints").exists()


def test_malformed_jsonl_data_names_the_file_and_line(tmp_path, tiny_config, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "fine"}\n')
    out = tmp_path / "run"
    err = _refused_before_any_step(tiny_args(tiny_config, out, "--data", str(data)), capsys)
    assert f"{data}:3 is not valid JSON" in err and "one JSON object per line" in err


def test_local_documents_keep_crlf_translation_and_unicode_line_separators(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\r\ntwo\rthree\n")
    row = json.dumps({"text": "x\u2028y"}, ensure_ascii=False)
    (tmp_path / "b.jsonl").write_bytes(f"{row}\r\n".encode())
    assert list(local_documents(tmp_path / "a.txt")) == ["one\ntwo\nthree\n"]
    assert list(local_documents(tmp_path / "b.jsonl")) == ["x\u2028y"]


def test_finetune_tables_name_a_non_utf8_file(tmp_path):
    table = tmp_path / "train.csv"
    table.write_bytes("text,label\nna\u00efve,1\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"train\.csv is not UTF-8 text: byte 0xef .*re-encode"):
        read_table(table)
    lines = tmp_path / "train.jsonl"
    lines.write_text('{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(ValueError, match=r"train\.jsonl: line 2 is not valid JSON"):
        read_table(lines)


# -------------------------------------------------------------------- optimizer state shapes


def _stepped(hidden=32, vocab=64, layers=1):
    torch.manual_seed(0)
    model = small_llama(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers
    )
    optimizer = GradNormLoRPAdamW(projected_param_groups(model, 4, 10, 0.25, "std"), lr=1e-3)
    ids = torch.randint(0, vocab, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


def test_load_state_dict_of_another_model_names_the_parameter_at_load_time():
    saved = _stepped(hidden=32).state_dict()
    target = _stepped(hidden=16)
    before = {k: v.clone() for k, v in target.state[target.param_groups[0]["params"][0]].items()
              if torch.is_tensor(v)}  # fmt: skip
    with pytest.raises(ValueError) as info:
        target.load_state_dict(saved)
    assert str(info.value).startswith(
        "model.layers.0.self_attn.q_proj.weight: the optimizer state dict's 'proj' has shape "
        "(4, 32) but this optimizer's parameter of shape (16, 16) needs (4, 16)"
    )
    after = target.state[target.param_groups[0]["params"][0]]
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was loaded


def test_load_state_dict_names_dense_moments_of_another_size():
    saved = _stepped(vocab=64).state_dict()
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: .*'exp_avg' has shape "
                       r"\(64, 32\) .*shape \(80, 32\) needs \(80, 32\)"):  # fmt: skip
        _stepped(vocab=80).load_state_dict(saved)


def test_load_state_dict_names_a_group_with_another_number_of_parameters():
    saved = _stepped(layers=2).state_dict()
    with pytest.raises(ValueError, match=r"param_groups\[0\] \(model\.layers\.0\..* holds 14 "):
        _stepped(layers=1).load_state_dict(saved)


def test_load_state_dict_of_the_same_model_still_loads():
    optimizer = _stepped()
    optimizer.load_state_dict(optimizer.state_dict())
