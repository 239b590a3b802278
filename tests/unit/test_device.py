"""Where runs compute: --device / --autocast / --tf32 resolution and the train loop on a device.

This machine has no GPU; CUDA availability is monkeypatched where a test needs torch to "see"
one, so every test means the same on a GPU host.
"""

import math

import pytest
import torch
from safetensors.torch import load_file

import gnlorp_dist.device as device_module
from gnlorp_dist.device import (
    check_autocast,
    describe_memory,
    memory_stats,
    resolve_device,
    to_device,
)
from gnlorp_dist.models import build_model, llama_config
from gnlorp_dist.training.config import config_from_args
from gnlorp_dist.training.run import estimated_peak_bytes, main, prepare, run_training, train
from tests.tiny_llama import tiny_args

pytestmark = pytest.mark.usefixtures("offline_shared_cache")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_fake_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_cpu_without_cuda_and_the_local_rank_gpu_with_it(monkeypatch, no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")  # a GPU host can still train on the CPU


def test_cuda_without_a_gpu_is_an_error_naming_the_flag(no_cuda):
    with pytest.raises(ValueError, match=r"--device cuda, but torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"--device cuda:1, but torch sees no CUDA device"):
        resolve_device("cuda:1")


def test_more_processes_than_gpus_and_bad_names_are_errors(two_fake_gpus):
    with pytest.raises(ValueError, match=r"--device cuda asks for GPU 2 but this host has 2"):
        resolve_device("cuda", local_rank=2)
    with pytest.raises(ValueError, match=r"'cuda:x'"):
        resolve_device("cuda:x")
    with pytest.raises(ValueError, match=r"--device 'tpu' is not a device"):
        resolve_device("tpu")


def test_autocast_needs_fp32_master_weights():
    check_autocast("none", "bf16")
    check_autocast("bf16", "fp32")
    with pytest.raises(ValueError, match=r"--autocast bf16 keeps fp32 master weights"):
        check_autocast("bf16", "bf16")
    with pytest.raises(ValueError, match=r"--autocast 'fp16'"):
        check_autocast("fp16", "fp32")


def test_to_device_keeps_a_tensor_already_there_and_memory_is_empty_on_cpu():
    batch = torch.arange(6).view(2, 3)
    assert to_device(batch, torch.device("cpu")) is batch
    assert memory_stats(torch.device("cpu")) == {}
    assert describe_memory({}) == ""
    stats = {"max_memory_allocated": 3 * 2**30, "max_memory_reserved": 4 * 2**30}
    assert describe_memory(stats) == "peak 3.00 GiB allocated / 4.00 GiB reserved"


def test_a_model_off_the_cpu_is_created_there_in_its_dtype():
    # The meta device stands in for a GPU: the construction path that never builds fp32.
    llama = llama_config("llama_7b")
    model = build_model(llama, dtype=torch.bfloat16, device="meta")
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"} and {p.dtype for p in params} == {
        torch.bfloat16
    }
    assert sum(p.numel() for p in params) > 6.7e9
    assert torch.get_default_dtype() == torch.float32  # restored


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--device", "cuda"], "--device cuda, but torch sees no CUDA device"),
        (["--dtype", "fp16"], "--dtype fp16 is not supported: fp16 needs dynamic loss scaling"),
        (["--dtype", "bf16", "--autocast", "bf16"], "--autocast bf16 keeps fp32 master"),
        (["--autocast", "bf16", "--deepspeed", "ds_configs/zero2.json"], "DeepSpeed casts"),
    ],
)
def test_device_and_precision_mistakes_exit_2_before_any_work(
    tmp_path, capsys, no_cuda, argv, named
):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_device_cpu_is_bitwise_the_default_run_on_a_cpu_host(tmp_path, tiny_config, no_cuda):
    default = train(config_from_args(tiny_args(tiny_config, tmp_path / "default")))
    cpu = train(config_from_args(tiny_args(tiny_config, tmp_path / "cpu", "--device", "cpu")))
    assert default.losses == cpu.losses and default.eval_loss == cpu.eval_loss
    assert default.memory == {} and default.estimated_peak_bytes is None
    a = load_file(tmp_path / "default" / "checkpoints" / "step-00000003" / "model.safetensors")
    b = load_file(tmp_path / "cpu" / "checkpoints" / "step-00000003" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_autocast_bf16_trains_fp32_weights_close_to_fp32(tmp_path, tiny_config):
    extra = ("--max-steps", "6", "--optimizer", "galore")
    fp32 = train(config_from_args(tiny_args(tiny_config, tmp_path / "fp32", *extra)))
    run = prepare(
        config_from_args(tiny_args(tiny_config, tmp_path / "amp", *extra, "--autocast", "bf16"))
    )
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    amp = run_training(run)
    assert all(math.isfinite(x) for x in amp.losses)
    assert amp.losses != fp32.losses  # bf16 matmuls really ran
    # bf16 rounds activations to 3 significant digits: same trajectory to well under 1%.
    assert amp.losses[-1] == pytest.approx(fp32.losses[-1], rel=1e-2)
    assert amp.losses[-1] < amp.losses[0] - 0.5


def test_every_checkpoint_load_names_its_device(tmp_path, tiny_config, monkeypatch):
    args = tiny_args(tiny_config, tmp_path, "--max-steps", "2")
    assert main(args) == 0
    calls = []
    real_load = torch.load

    def load_with_map_location(*args, **kwargs):
        calls.append(kwargs.get("map_location"))
        assert kwargs.get("map_location") is not None, args
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load_with_map_location)
    run = prepare(config_from_args([*args, "--max-steps", "3"]))
    assert run.start_step == 2 and len(calls) >= 3  # optimizer shard, scheduler, RNG


def test_the_estimate_beside_the_measured_peak_is_gnlorp_memorys(tmp_path, tiny_config):
    from gnlorp_dist.memory.estimator import MemoryConfig, estimate_memory

    run = prepare(config_from_args(tiny_args(tiny_config, tmp_path, "--bits", "8")))
    expected = estimate_memory(
        MemoryConfig(
            model=tiny_config, optimizer="gradnormlorp", bits=8, rank=16, tokens=64, seq_len=32,
            dtype="fp32",
        )
    )  # fmt: skip
    assert estimated_peak_bytes(run) == expected.total_bytes
    amp = prepare(config_from_args(tiny_args(tiny_config, tmp_path / "amp", "--autocast", "bf16")))
    assert estimated_peak_bytes(amp) is None  # the estimator does not model autocast


def test_tf32_flag_is_generated_from_the_config():
    from gnlorp_dist.training.config import build_parser

    parser = build_parser()
    assert parser.parse_args([]).tf32 is True
    assert parser.parse_args(["--no-tf32"]).tf32 is False
    assert parser.parse_args(["--no-progress"]).progress is False
    assert device_module.DEVICES == ("auto", "cpu", "cuda")
