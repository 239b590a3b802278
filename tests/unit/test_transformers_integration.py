"""gnlorp_dist.integrations.transformers in one process: options, refusals, the merged weights.

The Trainer runs themselves (one process, DDP, ZeRO 2/3, SFTTrainer, resume) are in
tests/distributed/test_clients.py.
"""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm
from gnlorp_dist.integrations.transformers import (
    GradNormLoRPConfig,
    GradNormLoRPTrainer,
    GradNormLoRPTrainerMixin,
    build_gnlorp_optimizer,
    gnlorp_optimizer_cls_and_kwargs,
    has_weight_norm,
    merged_state_dict,
)


def _model(weight_norm: bool = True) -> torch.nn.Module:
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    return apply_weight_norm(model) if weight_norm else model


def _args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def test_options_come_from_optim_args_and_target_modules(tmp_path):
    args = _args(
        tmp_path,
        optim_args="rank=8, update_proj_gap=50,scale=0.5,proj_type=left,bits=8",
        optim_target_modules=["q_proj", "v_proj"],
    )
    config = GradNormLoRPConfig.from_training_args(args)
    assert config == GradNormLoRPConfig(
        rank=8, update_proj_gap=50, scale=0.5, proj_type="left", bits=8,
        target_modules=("q_proj", "v_proj"),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("rank8", "is not key=value"),
        ("alpha=2", "is not key=value"),
        ("rank=0", "rank=0 must be a positive int"),
        ("proj_type=diag", "proj_type='diag' is not one of"),
        ("bits=4", "bits=4 is not supported; use 32 or 8"),
    ],
)
def test_bad_options_are_refused_with_the_fix(tmp_path, optim_args, message):
    with pytest.raises(ValueError, match=message):
        GradNormLoRPConfig.from_training_args(_args(tmp_path, optim_args=optim_args))


def test_plain_function_gives_projected_groups_and_the_trainer_hyperparameters(tmp_path):
    model = _model()
    args = _args(tmp_path, learning_rate=3e-3, weight_decay=0.1, adam_beta2=0.99)
    cls, kwargs = gnlorp_optimizer_cls_and_kwargs(model, args, GradNormLoRPConfig(rank=4))
    assert cls is GradNormLoRPAdamW
    projected, dense = kwargs.pop("params")
    assert projected["rank"] == 4 and "rank" not in dense  # not one plain-AdamW group
    assert len(projected["params"]) == 7  # q/k/v/o/gate/up/down directions
    assert kwargs == {
        "lr": 3e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, "bits": 32,
        "min_8bit_size": 4096,
    }  # fmt: skip
    optimizer = build_gnlorp_optimizer(model, args, GradNormLoRPConfig(rank=4, bits=8))
    assert optimizer.param_groups[0]["bits"] == 8


def _eight_bit_state_tensors(optimizer: GradNormLoRPAdamW) -> int:
    """Parameters whose state holds 8-bit codes (uint8 tensors) after a step."""
    return sum(
        any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in state.values())
        for state in optimizer.state.values()
    )


def test_bits_8_logs_what_is_8bit_and_min_8bit_size_is_an_option(tmp_path, caplog):
    model = _model()  # hidden 16: every moment is under the default min_8bit_size (4096)
    args = _args(tmp_path, learning_rate=1e-3)
    logger = "gnlorp_dist.integrations.transformers"
    with caplog.at_level(logging.INFO, logger=logger):
        build_gnlorp_optimizer(model, args, GradNormLoRPConfig(rank=4, bits=8))
    (record,) = [r for r in caplog.records if r.name == logger]
    assert record.levelno == logging.WARNING
    assert "bits=8: 0 of 19 tensors keep 8-bit Adam moments" in record.getMessage()
    assert "nothing is quantised. Lower GradNormLoRPConfig(min_8bit_size=...)" in (
        record.getMessage()
    )
    caplog.clear()
    config = GradNormLoRPConfig.from_training_args(
        _args(tmp_path, optim_args="rank=4,bits=8,min_8bit_size=100")
    )
    assert config.min_8bit_size == 100
    with caplog.at_level(logging.INFO, logger=logger):
        optimizer = build_gnlorp_optimizer(model, args, config)
    (record,) = [r for r in caplog.records if r.name == logger]
    # 19 tensors: 7 projected directions, 7 magnitudes, 3 norms, embedding and head. At 100:
    # the 64 x 16 embedding and head, and gate/up/down (low-rank moments of 4 x 32) are 8-bit.
    assert record.levelno == logging.INFO
    assert "bits=8: 5 of 19 tensors keep 8-bit Adam moments" in record.getMessage()
    model(
        input_ids=torch.arange(8).reshape(1, 8), labels=torch.arange(8).reshape(1, 8)
    ).loss.backward()
    optimizer.step()
    assert _eight_bit_state_tensors(optimizer) == 5  # the log says what the optimizer does
    with pytest.raises(ValueError, match="min_8bit_size=0 must be an int >= 1"):
        GradNormLoRPConfig(min_8bit_size=0)


def test_per_layer_is_refused_in_the_trainer(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="per_layer=True is not supported in the Trainer"):
        gnlorp_optimizer_cls_and_kwargs(model, _args(tmp_path), GradNormLoRPConfig(per_layer=True))
    with pytest.raises(ValueError, match="PerLayerUpdates steps every parameter"):
        GradNormLoRPTrainer(model=model, args=_args(tmp_path, optim_args="rank=4,per_layer=true"))


def test_trainer_refuses_an_optimizer_it_would_ignore_under_deepspeed(tmp_path):
    model = _model()
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"optimizers=\(AdamW\(...\), ...\) with Training"):
        GradNormLoRPTrainer(
            model=model, args=_args(tmp_path, deepspeed=ds), optimizers=(optimizer, None)
        )
    with pytest.raises(ValueError, match="drop optimizer_cls_and_kwargs"):
        GradNormLoRPTrainer(
            model=model, args=_args(tmp_path),
            optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-3}),
        )  # fmt: skip
    with_optimizer = dict(ds, optimizer={"type": "AdamW", "params": {}})
    with pytest.raises(ValueError, match="names an optimizer"):
        GradNormLoRPTrainer(model=model, args=_args(tmp_path, deepspeed=with_optimizer))
    assert not torch.distributed.is_initialized()  # refused before any engine set-up


def test_create_optimizer_builds_ours(tmp_path):
    model = _model()
    args = _args(tmp_path, optim_args="rank=4,update_proj_gap=10", learning_rate=1e-3)
    trainer = GradNormLoRPTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, GradNormLoRPAdamW)
    assert optimizer.param_groups[0]["rank"] == 4
    assert optimizer.param_groups[0]["update_proj_gap"] == 10


def test_merged_state_dict_is_the_original_architecture_with_the_same_function():
    plain = _model(weight_norm=False)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # move off the initial point so the merge is not trivially W0
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    merged = merged_state_dict(model)
    assert merged.keys() == plain.state_dict().keys()
    assert has_weight_norm(model) and not has_weight_norm(plain)
    plain.load_state_dict(merged)
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        diff = (plain(ids).logits - model(ids).logits).abs().max()
    assert diff < 1e-5
    assert model.state_dict().keys() == before.keys()  # the model itself is untouched


def test_imports_stay_light():
    code = (
        "import sys, gnlorp_dist; assert 'transformers' not in sys.modules; "
        "import gnlorp_dist.integrations.transformers; assert 'trl' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# The Trainer methods GradNormLoRPTrainerMixin overrides, and the private ones it calls: a
# transformers release that renames one or changes its parameters would otherwise bypass the
# override silently (the Trainer would call its own) or break the call. Checked on every version
# the suite runs on (5.23 in the dev venv, the GPU image's 5.17 under `make device-sim`).
OVERRIDDEN = {
    "create_optimizer": ["self", "model"],
    "_save_optimizer_and_scheduler": ["self", "output_dir"],
    "save_model": ["self", "output_dir", "_internal_call"],
}
CALLED = {"_save": ["self", "output_dir", "state_dict"]}


@pytest.mark.parametrize("name", [*OVERRIDDEN, *CALLED])
def test_the_trainer_methods_we_override_or_call_keep_their_signatures(name):
    from transformers import Trainer

    expected = {**OVERRIDDEN, **CALLED}[name]
    theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
    assert theirs == expected, f"transformers {transformers.__version__}: Trainer.{name}{theirs}"
    if name in OVERRIDDEN:
        ours = list(inspect.signature(getattr(GradNormLoRPTrainer, name)).parameters)
        assert ours == expected
        assert name in GradNormLoRPTrainerMixin.__dict__


def test_save_model_writes_the_merged_model_that_stock_transformers_loads(tmp_path):
    model = _model()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    trainer = GradNormLoRPTrainer(model=model, args=_args(tmp_path / "run"))
    trainer.save_model(str(tmp_path / "merged"))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert not has_weight_norm(reloaded)
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        diff = (reloaded(ids).logits - model(ids).logits).abs().max()
    assert diff < 1e-5


def test_save_model_writes_nothing_on_a_rank_that_does_not_save(tmp_path, monkeypatch):
    """transformers 5.17's Trainer._save writes from whichever rank calls it: only the writing
    rank (``args.should_save``) may call it, or every DDP rank writes the same files at once."""
    trainer = GradNormLoRPTrainer(model=_model(), args=_args(tmp_path / "run"))
    monkeypatch.setattr(type(trainer.args), "should_save", property(lambda self: False))
    trainer.save_model(str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
