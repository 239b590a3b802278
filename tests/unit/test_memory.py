"""The memory estimator (shape arithmetic) against exact live-tensor accounting of real steps."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from gnlorp_dist import GradNormLoRPAdamW, apply_weight_norm, projected_param_groups
from gnlorp_dist.memory import (
    COMPONENTS,
    LiveTensorTracker,
    MemoryConfig,
    build_for_config,
    estimate_memory,
    measure_config,
    measure_training_step,
)
from gnlorp_dist.memory.arithmetic import cached_model_shape
from gnlorp_dist.memory.cli import main
from gnlorp_dist.models import build_model, llama_config


@pytest.fixture(autouse=True)
def _one_thread():
    # Memory does not depend on threads; LAPACK's SVD of these tiny matrices does: with two
    # OpenMP threads on a loaded 2-core machine it was ~100x slower than with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SEVEN_B_CALL = [
    "--model", "llama_7b", "--optimizer", "gradnormlorp", "--bits", "8", "--per-layer",
    "--rank", "1024", "--tokens", "256", "--json",
]  # fmt: skip


def _decoder_heavy_config(tmp_path) -> str:
    """A LLaMA whose decoder layers (not the vocabulary) hold most parameters."""
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 128,
                "intermediate_size": 352,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "max_position_embeddings": 128,
                "vocab_size": 256,
            }
        )
    )
    return str(path)


def test_the_7b_cli_call_prints_one_json_object_whose_total_is_the_sum():
    result = subprocess.run(
        [sys.executable, "-m", "gnlorp_dist.memory.cli", *SEVEN_B_CALL],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    estimate = json.loads(lines[0])
    components = [estimate[f"{name}_bytes"] for name in COMPONENTS]
    assert estimate["total_bytes"] == sum(components)
    # The peak is the largest of the modelled moments, and 7B weights alone are bf16 bytes.
    assert estimate["total_bytes"] == max(m["total"] for m in estimate["moments"].values())
    assert estimate["weights_bytes"] >= 2 * 6_738_415_616
    # Per-layer: at most one gradient at a time, the largest being lm_head's.
    assert estimate["peak_gradient_bytes"] == 2 * 32000 * 4096
    # The fused (chunked) 8-bit update and weight norm without x·Vᵀ: under 20 GiB as is.
    assert estimate["total_gib"] <= 20.0


def test_human_output_lists_every_component(capsys):
    assert main(["--model", "llama_nano", "--tokens", "64", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    for name in (*COMPONENTS, "total"):
        assert name in out
    assert "GiB" in out and "GB" in out


@pytest.mark.parametrize(
    "fields",
    [
        dict(per_layer=False, bits=32),
        dict(per_layer=True, bits=32),
        dict(per_layer=True, bits=8),
        dict(per_layer=False, bits=8, optimizer="galore", activation_checkpointing=True),
    ],
    ids=["normal", "per-layer", "per-layer-8bit", "galore-8bit-checkpointing"],
)
def test_estimate_agrees_with_measured_peak(fields):
    fields.setdefault("optimizer", "gradnormlorp")
    config = MemoryConfig(model="llama_nano", tokens=64, dtype="fp32", **fields)
    estimate = estimate_memory(config)
    measured = measure_config(config)
    assert abs(estimate.total_bytes - measured.peak_bytes) <= 0.01 * measured.peak_bytes
    # The structural activation formula is exact, term by term, for this transformers version.
    if not config.activation_checkpointing:
        assert estimate.saved_activation_bytes == measured.saved_activation_bytes
    assert sum(measured.breakdown.values()) == measured.peak_bytes


def _matrix_heavy_config(tmp_path) -> str:
    """A LLaMA with a 64-token vocabulary: the projected matrices' refresh, projection and
    update (not lm_head's or the embedding's) set the step's peak."""
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 128,
                "intermediate_size": 512,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 128,
                "vocab_size": 64,
            }
        )
    )
    return str(path)


@pytest.mark.parametrize(
    "fields",
    [
        dict(bits=32),
        dict(bits=8, proj_bits=4, svd_method="randomized"),
        dict(bits=32, proj_bits=8),
        dict(bits=8, proj_bits=4, dtype="bf16"),
        dict(bits=8, proj_bits=8, per_layer=True),
        dict(bits=8, proj_bits=4, per_layer=True, dtype="bf16"),
    ],
    ids=[
        "fp32-bases",
        "int4-bases-randomized",
        "int8-bases-32bit",
        "int4-bases-bf16",
        "int8-bases-per-layer",
        "int4-bases-per-layer-bf16",
    ],
)
def test_projected_matrices_workspace_agrees_with_measured_peak(tmp_path, fields):
    """The refresh (full or randomized SVD, the old basis restored, the new one quantised), the
    projection with a restored basis, the chunked 8-bit update and the back-projection: the
    normal path's step is modelled op by op (exact), the per-layer hook within 1%."""
    fields.setdefault("dtype", "fp32")
    config = MemoryConfig(model=_matrix_heavy_config(tmp_path), tokens=8, rank=32, **fields)
    estimate = estimate_memory(config)
    measured = measure_config(config)
    assert measured.breakdown["projection"] == estimate.breakdown["projection"]
    if config.per_layer:
        assert abs(estimate.total_bytes - measured.peak_bytes) <= 0.01 * measured.peak_bytes
    else:
        assert measured.peak_phase == "step"
        assert estimate.total_bytes == measured.peak_bytes
        assert estimate.breakdown == measured.breakdown


@pytest.mark.parametrize("numel", [4096, 5000, 1 << 18, (1 << 18) + 1000, 3 << 18])
@pytest.mark.parametrize("kind", ["dense", "projected"])
def test_update_workspace_bytes_is_the_measured_chunk_workspace(numel, kind):
    """``update_workspace_bytes`` (what the estimator uses) is what one 8-bit update, chunk by
    chunk, allocates beyond its moments, gradient and weights, to the byte."""
    from gnlorp_dist.optim.functional import (  # noqa: PLC0415
        dense_adamw_step,
        normalized_low_rank_update,
        update_moments_,
    )
    from gnlorp_dist.optim.quantized import MomentStore, update_workspace_bytes  # noqa: PLC0415

    grad, weights, state = torch.randn(numel), torch.randn(numel), {}
    moments = MomentStore(state, 8, param_numel=numel)

    def update() -> None:
        for start, stop, exp_avg, exp_avg_sq in moments.chunks(grad):
            if kind == "projected":  # driver.adam_directions: the direction overwrites R
                chunk = grad[start:stop]
                update_moments_(exp_avg, exp_avg_sq, chunk, 0.9, 0.999)
                chunk.copy_(normalized_low_rank_update(exp_avg, exp_avg_sq, 1e-8))
            else:
                dense_adamw_step(weights[start:stop], grad[start:stop], exp_avg, exp_avg_sq,
                                 step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                 weight_decay=0.0)  # fmt: skip

    update()  # creates the codes and scales
    tracker = LiveTensorTracker()
    for tensor in (grad, weights, *[v for v in state.values() if torch.is_tensor(v)]):
        tracker.track(tensor)
    before = tracker.current
    with tracker:
        update()
    assert tracker.peak - before == update_workspace_bytes(numel, 8)
    assert update_workspace_bytes(numel, 8) <= 34 * (1 << 18)  # a few chunks, whatever numel
    assert update_workspace_bytes(numel, 32, element_size=2) == 4 * numel


def test_proj_bits_shrink_the_bases_and_fit_the_7b_recipe():
    seven_b = dict(model="llama_7b", bits=8, per_layer=True, rank=1024, tokens=256)
    bases = {
        bits: estimate_memory(MemoryConfig(**seven_b, proj_bits=bits)).breakdown["projection"]
        for bits in (16, 8, 4)
    }
    # 7B bases are (1024, 4096) or (4096, 1024): whole groups of 128, 4 bytes of scale each.
    assert bases[8] == bases[16] // 2 + bases[16] // 2 // 128 * 4
    assert bases[4] == bases[16] // 4 + bases[16] // 2 // 128 * 4
    as_is = MemoryConfig(**seven_b)  # the call: 8-bit, per-layer, rank 1024, 256 tokens
    assert estimate_memory(as_is).total_bytes <= 20 * 2**30
    for proj_bits in (8, 4):  # the recipe (launch/single_gpu_7b.sh) and its INT4 variant
        recipe = MemoryConfig(**seven_b, proj_bits=proj_bits, activation_checkpointing=True)
        assert estimate_memory(recipe).total_bytes <= 18 * 2**30


def test_the_removed_fused_flag_is_a_clear_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "llama_nano", "--bits", "8", "--assume-fused-8bit-update"])
    assert exit_info.value.code == 2
    assert "--assume-fused-8bit-update was removed" in capsys.readouterr().err


def test_accumulation_with_per_layer_updates_agrees_with_measured_peak():
    config = MemoryConfig(
        model="llama_nano", tokens=32, dtype="fp32", per_layer=True, accumulation_steps=2
    )
    measured = measure_config(config)
    estimate = estimate_memory(config)
    assert abs(estimate.total_bytes - measured.peak_bytes) <= 0.05 * measured.peak_bytes
    assert measured.breakdown["accumulation_buffers"] > 0 or measured.peak_phase == "backward"


def test_per_layer_holds_one_gradient_at_a_time_and_drops_the_peak(tmp_path):
    model = _decoder_heavy_config(tmp_path)
    base = MemoryConfig(model=model, tokens=8, dtype="fp32", rank=16)
    normal = measure_config(base)
    layered = measure_config(MemoryConfig(**{**base.__dict__, "per_layer": True}))
    full = normal.full_gradient_bytes
    largest = 4 * max(p.numel() for p in build_for_config(base)[0].parameters())
    assert normal.peak_gradient_bytes == full
    assert layered.peak_gradient_bytes == largest
    # Whole-step peak: the normal path holds every gradient (and then the step's workspace);
    # per-layer holds one gradient and its update workspace at a time, while activations are
    # still alive. The drop is therefore the full gradient minus what per-layer still needs at
    # its worst moment: below the full gradient, and what the estimator says it is.
    drop = normal.peak_bytes - layered.peak_bytes
    assert 0.6 * full <= drop < full, (drop, full)
    estimated_drop = (
        estimate_memory(base).total_bytes
        - estimate_memory(MemoryConfig(**{**base.__dict__, "per_layer": True})).total_bytes
    )
    assert abs(estimated_drop - drop) <= 0.05 * full


@pytest.mark.parametrize("proj_bits", [16, 8, 4])
def test_estimated_8bit_state_bytes_equal_the_real_optimizers(proj_bits):
    config = MemoryConfig(
        model="llama_nano", tokens=16, dtype="fp32", bits=8, rank=32, proj_bits=proj_bits
    )
    model, optimizer, micro = build_for_config(config)
    measure_training_step(model, optimizer, micro, warmup_steps=0)
    states = projection = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                if key in ("proj", "proj_scale"):
                    projection += value.untyped_storage().nbytes()
                else:
                    states += value.untyped_storage().nbytes()
    estimate = estimate_memory(config)
    assert estimate.breakdown["optimizer_states"] == states
    assert estimate.breakdown["projection"] == projection
    codes = [v for s in optimizer.state.values() for k, v in s.items() if k == "exp_avg"]
    assert any(c.dtype == torch.uint8 for c in codes)  # the 8-bit layout is really in use


def test_7b_estimate_needs_no_allocation():
    cached_model_shape.cache_clear()  # build the meta model inside the tracker
    tracker = LiveTensorTracker()
    with tracker:
        estimate = estimate_memory(MemoryConfig(model="llama_7b", bits=8, per_layer=True))
    assert tracker.peak < 2**20  # meta tensors only: nothing close to the model's size
    assert estimate.num_parameters > 6.7e9


def test_tracker_counts_views_once_and_frees():
    tracker = LiveTensorTracker()
    with tracker:
        x = torch.ones(1000)
        view = x[:10]  # noqa: F841
        y = x * 2
        del y
    assert tracker.peak == 8000
    assert tracker.current == 4000


def test_accounting_classifies_the_peak():
    config = llama_config("llama_nano")
    model = apply_weight_norm(build_model(config))
    groups = projected_param_groups(model, rank=16, update_proj_gap=1, scale=0.25)
    optimizer = GradNormLoRPAdamW(groups, lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (1, 64))
    measured = measure_training_step(model, optimizer, ids)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert 0 <= measured.breakdown["weights"] - weights <= 1024  # plus the rotary buffers
    # 64 tokens: the peak is the optimizer step, every gradient alive, activations long gone.
    assert measured.peak_phase == "step"
    assert measured.breakdown["gradients"] == measured.full_gradient_bytes
    assert measured.breakdown["activations"] == 0
    assert measured.saved_activation_bytes > 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(model="llama_9000"), "unknown model"),
        (dict(model="llama_nano", optimizer="sgd"), "optimizer='sgd'"),
        (dict(model="llama_nano", bits=4), "bits=4"),
        (dict(model="llama_nano", rank=129), "rank=129"),
        (dict(model="llama_nano", tokens=0), "tokens=0"),
        (dict(model="llama_nano", optimizer="adamw", per_layer=True), "per_layer=True"),
        (dict(model="llama_nano", dtype="fp16"), "dtype='fp16'"),
        (dict(model="llama_nano", tokens=10, seq_len=3), "seq_len=3"),
        (dict(model="llama_nano", proj_type="diagonal"), "proj_type='diagonal'"),
        (dict(model="llama_nano", proj_bits=2), "proj_bits=2"),
        (dict(model="llama_nano", svd_method="qr"), "svd_method='qr'"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_value(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        estimate_memory(MemoryConfig(**fields))


def test_cli_reports_bad_input_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "llama_nano", "--rank", "4096"])
    assert exit_info.value.code == 2
    assert "rank=4096" in capsys.readouterr().err


def test_sharding_divides_states_over_ranks():
    one = estimate_memory(MemoryConfig(model="llama_60m", bits=8))
    four = estimate_memory(MemoryConfig(model="llama_60m", bits=8, world_size=4, shard_states=True))
    assert four.breakdown["optimizer_states"] == math.ceil(one.breakdown["optimizer_states"] / 4)
    assert four.breakdown["weights"] == one.breakdown["weights"]
