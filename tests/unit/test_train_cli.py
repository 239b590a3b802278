"""gnlorp-train end to end: loss falls, the merged model reloads, a killed run resumes exactly."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gnlorp_dist.data.corpus import load_tokenizer
from gnlorp_dist.distributed import DistributedContext
from gnlorp_dist.nn import WeightNormLinear
from gnlorp_dist.optim import GradNormLoRPAdamW
from gnlorp_dist.training.config import RunConfig, config_from_args, resolve
from gnlorp_dist.training.run import build_training_model, main, prepare, run_training, train
from tests.tiny_llama import tiny_args

pytestmark = pytest.mark.usefixtures("offline_shared_cache")


def test_default_style_run_lowers_loss_and_saves_a_reloadable_merged_model(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--seq-len", "64", "--max-steps", "20", "--eval-batches", "4"]
    assert main([*args, "--output-dir", str(out), "--no-progress", "--log-every", "5"]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"step +\d+/20 \| loss [\d.]+ \| lr", printed)) == 4
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", printed).groups())
    assert first == pytest.approx(math.log(32000), abs=0.2)  # a fresh model is uniform
    assert last < first - 1.5, printed  # 10.4 -> about 7.5 after 20 small steps
    eval_ppl = float(re.search(r"eval @ step 20 \| loss [\d.]+ \| perplexity ([\d.]+)", printed)[1])
    assert math.isfinite(eval_ppl) and eval_ppl < 5000
    assert "model llama_nano" in printed and "optimizer gradnormlorp" in printed
    reported = float(re.search(r"max \|logit diff\| ([\d.e+-]+)", printed)[1])
    assert reported < 1e-4

    # Independently: rebuild the trained (weight-normalised) model from the last checkpoint and
    # compare it with the merged model loaded by stock transformers.
    config, llama = resolve(config_from_args([*args, "--output-dir", str(out)]))
    trained = build_training_model(config, llama)
    assert any(isinstance(m, WeightNormLinear) for m in trained.modules())
    trained.load_state_dict(load_file(out / "checkpoints" / "step-00000020" / "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out / "final", local_files_only=True)
    text = "To be, or not to be: that is the question."
    ids = torch.tensor([load_tokenizer()(text, add_special_tokens=False)["input_ids"]])
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, rtol=0, atol=1e-4)
    info = json.loads((out / "final" / "gnlorp_train.json").read_text())
    assert info["step"] == 20 and info["eval_perplexity"] == pytest.approx(eval_ppl, rel=1e-3)


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from gnlorp_dist.checkpoint import store as checkpoint
    from gnlorp_dist.training.config import config_from_args
    from gnlorp_dist.training.run import train

    real_torch_save = checkpoint._torch_save

    def torch_save_then_die(obj, path):
        # SIGKILL while step 6's checkpoint is half written (model file done, optimizer not).
        if path.parent.name.startswith("step-00000006.tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_torch_save(obj, path)

    checkpoint._torch_save = torch_save_then_die
    train(config_from_args(sys.argv[1:]), on_step_end=lambda step, saved: print("step", step, saved, flush=True))
    """
)


def test_killed_run_resumes_bitwise(tmp_path, tiny_config):
    extra = ["--max-steps", "8", "--save-every", "2", "--keep-checkpoints", "3",
             "--grad-accum", "2", "--update-proj-gap", "3", "--warmup-steps", "2", "--seed", "5"]  # fmt: skip
    reference = train(config_from_args(tiny_args(tiny_config, tmp_path / "ref", *extra)))
    assert reference.final_step == 8

    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *tiny_args(tiny_config, killed, *extra)],
        capture_output=True, text=True, env=dict(os.environ), timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "step 6 None" not in proc.stdout and "step 5 None" in proc.stdout
    checkpoints = killed / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if ".tmp" not in p.name) == [
        "step-00000002", "step-00000004",
    ]  # fmt: skip
    assert any(p.name.startswith("step-00000006.tmp") for p in checkpoints.iterdir())

    assert main(tiny_args(tiny_config, killed, *extra, "--resume", "auto")) == 0
    assert not any(".tmp" in p.name for p in checkpoints.iterdir())  # swept by the next save
    ref_ckpt = tmp_path / "ref" / "checkpoints" / "step-00000008"
    new_ckpt = checkpoints / "step-00000008"
    ref_w, new_w = (
        load_file(ref_ckpt / "model.safetensors"),
        load_file(new_ckpt / "model.safetensors"),
    )
    assert ref_w.keys() == new_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], new_w[name]), name
    shard = "optimizer-shard-00000-of-00001.pt"
    ref_opt = torch.load(ref_ckpt / shard, weights_only=True)["entries"]
    new_opt = torch.load(new_ckpt / shard, weights_only=True)["entries"]
    assert ref_opt.keys() == new_opt.keys() and ref_opt
    for key, entry in ref_opt.items():
        for field, value in entry["state"].items():
            if torch.is_tensor(value):
                assert torch.equal(value, new_opt[key]["state"][field]), (key, field)
    ref_state = json.loads((ref_ckpt / "trainer_state.json").read_text())
    assert ref_state == json.loads((new_ckpt / "trainer_state.json").read_text())


@pytest.mark.parametrize(
    "extra",
    [["--optimizer", "gradnormlorp"], ["--optimizer", "galore"], ["--optimizer", "adamw"],
     ["--lora-rank", "4", "--detach-norm"], ["--dtype", "bf16"]],
    ids=["gradnormlorp", "galore", "adamw", "lora", "bf16"],
)  # fmt: skip
def test_each_optimizer_trains(tmp_path, tiny_config, extra):
    run = prepare(config_from_args(tiny_args(tiny_config, tmp_path, *extra)))
    weight_normed = any(isinstance(m, WeightNormLinear) for m in run.model.modules())
    assert weight_normed == (run.config.optimizer == "gradnormlorp")
    if run.config.optimizer == "adamw":
        assert type(run.optimizer) is torch.optim.AdamW and run.config.lr == 1e-3
    else:
        assert isinstance(run.optimizer, GradNormLoRPAdamW)
        # fallback recipe: width / 4 = 16; LoRA mode: at most the adapters' rank
        assert run.optimizer.param_groups[0]["rank"] == (4 if run.config.lora_rank else 16)
    result = run_training(run)
    assert result.final_step == 3 and all(math.isfinite(x) for x in result.losses)
    bound = 0.05 if run.config.dtype == "bf16" else 1e-4  # bf16 rounds the merged weights
    assert result.merged_max_abs_logit_diff < bound
    assert (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--optimizer", "sgd"], "'sgd'"),
        (["--model", "llama_3b"], "unknown model 'llama_3b'"),
        (["--model-config", "/no/such/config.json"], "/no/such/config.json"),
        (["--data", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
        (["--tokenizer", "/no/such/tokenizer"], "/no/such/tokenizer"),
        (["--optimizer", "adamw", "--lora-rank", "4"], "--lora-rank"),
        (["--lora-rank", "4", "--rank", "8"], "--rank 8 exceeds --lora-rank 4"),
        (["--seq-len", "4096"], "--seq-len 4096"),
        (["--resume", "/no/such/checkpoint"], "/no/such/checkpoint"),
    ],
)
def test_bad_input_is_a_cli_error_naming_the_value(tmp_path, capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_resume_refuses_an_incompatible_checkpoint(tmp_path, tiny_config, capsys):
    assert main(tiny_args(tiny_config, tmp_path, "--max-steps", "1")) == 0
    with pytest.raises(SystemExit):
        main(tiny_args(tiny_config, tmp_path, "--optimizer", "galore"))
    err = capsys.readouterr().err
    assert "incompatible" in err and "optimizer: checkpoint 'gradnormlorp', now 'galore'" in err
    with pytest.raises(SystemExit):
        main(tiny_args(tiny_config, tmp_path, "--resume", "never"))
    assert "already holds checkpoints" in capsys.readouterr().err
    # --resume with another run's folder continues from that run's newest checkpoint.
    second = tmp_path / "second"
    assert main(tiny_args(tiny_config, second, "--max-steps", "2", "--resume", str(tmp_path))) == 0
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-00000001'} (step 1)" in (
        capsys.readouterr().out
    )
    assert [p.name for p in (second / "checkpoints").iterdir()] == ["step-00000002"]


def test_per_layer_on_several_processes_names_the_grad_clip_flag(tmp_path, tiny_config):
    # Before: PerLayerUpdates' message named its API argument max_grad_norm.
    two_ranks = DistributedContext(rank=0, world_size=2, local_rank=0, communicator=None)
    argv = tiny_args(tiny_config, tmp_path, "--per-layer", "--grad-reduction", "low_rank")
    with pytest.raises(ValueError, match=r"--grad-clip 1; pass --grad-clip 0$") as refused:
        prepare(config_from_args(argv), two_ranks)
    assert "--per-layer with 2 processes" in str(refused.value)
    assert "max_grad_norm" not in str(refused.value)


def test_module_entry_point_reports_a_missing_data_path(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gnlorp_dist.training.run", "--data", str(tmp_path / "missing.jsonl")],
        capture_output=True, text=True, env=dict(os.environ), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"data path '{tmp_path / 'missing.jsonl'}' does not exist" in proc.stderr


def test_run_config_is_keyword_only_and_documents_every_flag():
    with pytest.raises(TypeError):
        RunConfig("llama_nano")  # noqa
    from gnlorp_dist.training.config import build_parser, field_docs

    docs = field_docs(RunConfig)
    assert set(docs) == {f for f in RunConfig.__dataclass_fields__}
    help_text = build_parser().format_help()
    for flag in ("--model-config", "--update-proj-gap", "--lora-rank", "--detach-norm",
                 "--min-lr-ratio", "--grad-clip", "--keep-checkpoints", "--no-progress"):  # fmt: skip
        assert flag in help_text
