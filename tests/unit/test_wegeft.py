"""WeGeFT (weight-generative fine-tuning): the layer against its definition, surgery, the
shared variant, exact merging, and the gnlorp-finetune / gnlorp-bench methods end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification

from gnlorp_dist.finetune import FinetuneConfig, prepare
from gnlorp_dist.finetune.cli import main as finetune_main
from gnlorp_dist.finetune.config import config_from_args
from gnlorp_dist.nn import WeGeFTLinear, apply_wegeft, merge_wegeft
from gnlorp_dist.nn.wegeft import (
    WeGeFTGenerator,
    merge_wegeft_weight,
    share_key,
    wegeft_generators,
    wegeft_linear,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "finetune"
SENTIMENT = [
    "--train-file", str(EXAMPLES / "sentiment_train.csv"),
    "--validation-file", str(EXAMPLES / "sentiment_validation.csv"),
    "--model", "tiny-roberta",
]  # fmt: skip


class Block(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden)

    def forward(self, x):
        return x + self.down_proj(torch.tanh(self.up_proj(self.q_proj(x))))


class Stack(nn.Module):
    def __init__(self, depth: int = 3, hidden: int = 24, ffn: int = 40) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(hidden, ffn) for _ in range(depth))
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


TARGETS = ("q_proj", "up_proj", "down_proj")


def _randomise(model: nn.Module) -> None:
    """Give every generator a non-zero phi (at init Delta W = 0, which tests nothing)."""
    with torch.no_grad():
        for generator in wegeft_generators(model):
            generator.phi.normal_(0.0, 0.3)


# ------------------------------------------------------------------------------ the layer


def test_layer_matches_its_definition_and_starts_as_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    x = torch.randn(4, 5, 12)
    expected = base(x)
    layer = WeGeFTLinear(base, WeGeFTGenerator(12, 3), alpha=6.0)
    assert torch.equal(layer(x), expected)  # phi = 0: Delta W = 0, bit for bit
    assert torch.count_nonzero(layer.generator.psi) > 0
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    _randomise(layer)
    W0, phi, psi = base.weight.double(), layer.generator.phi.double(), layer.generator.psi.double()
    delta = (6.0 / 3) * W0 @ phi.T @ psi  # Delta W = s (W0 phi^T) psi, s = alpha / r
    reference = x.double() @ (W0 + delta).T + base.bias.double()
    torch.testing.assert_close(layer(x).double(), reference, rtol=1e-5, atol=1e-5)
    merged = merge_wegeft_weight(base.weight, layer.generator.phi, layer.generator.psi, 2.0)
    torch.testing.assert_close(merged.double(), W0 + delta, rtol=0, atol=1e-6)
    # gradients reach both generator factors and nothing frozen
    layer(x).square().sum().backward()
    assert layer.generator.phi.grad.abs().sum() > 0 and layer.generator.psi.grad.abs().sum() > 0
    assert base.weight.grad is None


def test_dropout_acts_on_the_generator_input_in_training_only():
    torch.manual_seed(0)
    W0, phi, psi, x = torch.randn(6, 8), torch.randn(2, 8), torch.randn(2, 8), torch.randn(3, 8)
    args = (x, W0, phi, psi)
    evaluated = wegeft_linear(*args, scaling=1.0, dropout=0.5, training=False)
    torch.testing.assert_close(evaluated, wegeft_linear(*args, scaling=1.0))
    assert not torch.allclose(
        wegeft_linear(*args, scaling=1.0, dropout=0.5, training=True), evaluated
    )


# --------------------------------------------------------------------------------- surgery


def _formula(model: nn.Module, rank: int, shared: bool) -> int:
    """2 r in per generator: one per wrapped layer, or one per tied group (per target name
    across the blocks) in the shared variant."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    wrapped = {n: m for n, m in layers.items() if n.rsplit(".", 1)[-1] in TARGETS}
    if shared:
        groups = {(share_key(n), m.in_features) for n, m in wrapped.items()}
        return sum(2 * rank * in_features for _, in_features in groups)
    return sum(2 * rank * m.in_features for m in wrapped.values())


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared"])
def test_surgery_trainable_count_sharing_and_exact_merge(shared):
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(2, 5, 24)
    expected = model(x)
    head_params = sum(p.numel() for p in model.head.parameters())
    formula = _formula(model, rank=4, shared=shared)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    apply_wegeft(model, TARGETS, rank=4, alpha=8.0, shared=shared)
    assert torch.equal(model(x), expected)  # same function at initialisation
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == formula + head_params
    assert formula == (2 * 4 * (24 + 24 + 40) * (1 if shared else 3))
    generators = wegeft_generators(model)
    assert len(generators) == (3 if shared else 9)
    q_generators = {id(block.q_proj.generator) for block in model.layers}
    assert len(q_generators) == (1 if shared else 3)
    if shared:  # one parameter object, trained by the gradients of every block
        phi = model.layers[0].q_proj.generator.phi
        assert all(block.q_proj.generator.phi is phi for block in model.layers)
        assert model.layers[0].q_proj.generator is not model.layers[0].up_proj.generator
    _randomise(model)
    wrapped = model(x)
    assert not torch.allclose(wrapped, expected)
    merged = merge_wegeft(copy.deepcopy(model))
    assert not any(isinstance(m, (WeGeFTLinear, WeGeFTGenerator)) for m in merged.modules())
    assert all(type(block.q_proj) is nn.Linear for block in merged.layers)
    torch.testing.assert_close(merged(x), wrapped, rtol=0, atol=1e-6)
    assert sorted(merged.state_dict()) == sorted(Stack().state_dict())  # the original layout


def test_surgery_rejects_bad_inputs_before_touching_the_model():
    model = Stack()
    with pytest.raises(ValueError, match="matched no module"):
        apply_wegeft(model, ("o_proj",))
    with pytest.raises(ValueError, match="rank=0 must be a positive int"):
        apply_wegeft(model, TARGETS, rank=0)
    with pytest.raises(ValueError, match="exceeds in_features=24"):
        apply_wegeft(model, TARGETS, rank=25)
    with pytest.raises(ValueError, match="dropout"):
        apply_wegeft(model, TARGETS, dropout=1.0)
    assert not any(isinstance(m, WeGeFTLinear) for m in model.modules())
    apply_wegeft(model, TARGETS, rank=2)
    with pytest.raises(ValueError, match="called twice"):
        apply_wegeft(model, TARGETS, rank=2)
    single = merge_wegeft(model.layers[0].q_proj)  # a bare layer comes back as a new Linear
    assert type(single) is nn.Linear and single.weight.shape == (24, 24)


# ------------------------------------------------------------------------------ finetune


@pytest.mark.usefixtures("offline_shared_cache")
def test_finetune_method_wegeft_trains_merges_and_reloads(tmp_path):
    out = tmp_path / "wegeft"
    args = [*SENTIMENT, "--method", "wegeft", "--wegeft-rank", "4", "--max-steps", "6"]
    args += ["--max-train-samples", "48", "--max-eval-samples", "32", "--output-dir", str(out)]
    args += ["--lr", "1e-2", "--log-every", "3"]
    assert finetune_main(args) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["config"]["optimizer"] == "wegeft" and record["steps"] == 6
    assert record["merged_max_abs_logit_diff"] < 1e-5
    assert record["reloaded_predictions_agree"] == 1.0
    # The initial model, rebuilt from the same config (same seed), for comparison.
    run = prepare(config_from_args(args))
    body = run.model.roberta
    per_layer = sum(2 * 4 * m.in_features for m in body.modules() if isinstance(m, WeGeFTLinear))
    head = sum(p.numel() for p in run.model.classifier.parameters())
    assert record["trainable_parameters"] == per_layer + head
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert all(n.startswith("classifier.") or ".generator." in n for n in trainable)
    weights = load_file(out / "final" / "model.safetensors")
    assert not any("generator" in k or "phi" in k or "psi" in k for k in weights)
    key = "roberta.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(weights[key], body.encoder.layer[0].attention.self.query.weight)
    embeddings = "roberta.embeddings.word_embeddings.weight"
    assert torch.equal(weights[embeddings], body.embeddings.word_embeddings.weight)  # frozen
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out / "final"))
    assert type(reloaded.roberta.encoder.layer[0].attention.self.query) is nn.Linear


def test_finetune_wegeft_flags_are_checked():
    from gnlorp_dist.finetune.config import resolve

    assert config_from_args(["--method", "wegeft"]).optimizer == "wegeft"
    resolved = resolve(FinetuneConfig(optimizer="wegeft"))
    assert resolved.wegeft_rank == 8 and resolved.lr == 2e-3
    assert resolve(FinetuneConfig(optimizer="wegeft", model="roberta-base")).lr == 4e-4
    with pytest.raises(ValueError, match="need --optimizer wegeft"):
        resolve(FinetuneConfig(wegeft_rank=4))
    with pytest.raises(ValueError, match="--bits 8 needs a projected optimizer"):
        resolve(FinetuneConfig(optimizer="wegeft", bits=8))


# ----------------------------------------------------------------------------------- bench


@pytest.mark.usefixtures("offline_shared_cache")
def test_bench_wegeft_method(tmp_path):
    from gnlorp_dist.bench import BenchConfig
    from gnlorp_dist.bench.config import DEFAULT_METHODS, METHODS, hyper, resolve
    from gnlorp_dist.bench.methods import build_method, target_state_bytes

    assert "wegeft" in METHODS and "wegeft" not in DEFAULT_METHODS
    shape = {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
    }  # fmt: skip
    (tmp_path / "tiny.json").write_text(json.dumps(shape))
    config, llama, _ = resolve(
        BenchConfig(model_config=str(tmp_path / "tiny.json"), rank=4, seq_len=16)
    )
    hp = hyper(config)
    adamw = build_method("adamw", llama, hp, seed=0)
    ours = build_method("wegeft", llama, hp, seed=0)
    layers = [m for m in ours.model.modules() if isinstance(m, WeGeFTLinear)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in both blocks
    frozen = sum(m.weight.numel() for m in layers)
    generators = sum(2 * 4 * m.in_features for m in layers)
    assert ours.trainable_parameters == adamw.trainable_parameters - frozen + generators
    ids = torch.randint(0, 32000, (2, 16))
    for setup in (adamw, ours):
        setup.model(input_ids=ids, labels=ids).loss.backward()
        setup.optimizer.step()
    assert 0 < target_state_bytes(ours.model, ours.optimizer)
    assert target_state_bytes(ours.model, ours.optimizer) < target_state_bytes(
        adamw.model, adamw.optimizer
    )
    assert math.isfinite(float(ours.model(input_ids=ids, labels=ids).loss.detach()))
