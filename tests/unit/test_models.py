"""LLaMA configs by name and by path, mapped to transformers field by field."""

import json

import pytest
import torch
from transformers import LlamaConfig

from gnlorp_dist.models import (
    MODEL_SPECS,
    build_model,
    build_model_on_meta,
    count_parameters,
    known_model_names,
    llama_config,
    model_spec,
    recipe_for_config,
)

# GaLore's configs/llama_60m.json, verbatim.
GALORE_60M_JSON = {
    "architectures": ["LLaMAForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "hidden_size": 512,
    "intermediate_size": 1376,
    "initializer_range": 0.02,
    "max_sequence_length": 1024,
    "model_type": "llama",
    "num_attention_heads": 8,
    "num_hidden_layers": 8,
    "pad_token_id": -1,
    "rms_norm_eps": 1e-06,
    "transformers_version": "4.28.1",
    "use_cache": True,
    "vocab_size": 32000,
}


@pytest.mark.parametrize("name", known_model_names())
def test_every_named_config_is_a_llama_with_tokenizer_ids_and_no_padding_index(name):
    spec, config = model_spec(name), llama_config(name)
    assert isinstance(config, LlamaConfig)
    assert config.hidden_size == spec.hidden_size
    assert config.intermediate_size == spec.intermediate_size
    assert config.num_hidden_layers == spec.num_layers
    assert config.num_attention_heads == spec.num_heads
    assert config.num_key_value_heads == spec.num_heads
    assert config.max_position_embeddings == spec.max_seq_len
    assert config.vocab_size == 32000
    assert config.pad_token_id is None
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert config.hidden_act == "silu" and config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings is False


def shape(spec):
    return (spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads)


def test_spec_table_numbers_for_60m_and_7b():
    s60, s7 = model_spec("llama_60m"), model_spec("llama_7b")
    assert shape(s60) == (512, 1376, 8, 8)
    assert (s60.max_seq_len, s60.rank, s60.update_proj_gap, s60.scale, s60.lr) == (
        1024, 128, 200, 0.25, 0.01,
    )  # fmt: skip
    assert s60.grad_clip is None
    assert shape(s7) == (4096, 11008, 32, 32)
    assert (s7.max_seq_len, s7.rank, s7.update_proj_gap, s7.scale, s7.lr, s7.grad_clip) == (
        2048, 1024, 500, 0.25, 0.005, 1.0,
    )  # fmt: skip
    nano = model_spec("llama_nano")
    assert shape(nano) == (128, 352, 2, 4)
    assert shape(model_spec("llama_micro")) == (256, 688, 4, 4)
    assert (nano.rank, nano.update_proj_gap, nano.lr) == (32, 50, 0.01)


def test_spec_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        type(MODEL_SPECS["llama_nano"])("x", 1, 1, 1, 1, 1, 1, 1, 0.1, 0.1)  # positional
    with pytest.raises(AttributeError):
        MODEL_SPECS["llama_nano"].rank = 3


def test_galore_json_maps_the_three_pitfalls(tmp_path):
    path = tmp_path / "llama_60m.json"
    path.write_text(json.dumps(GALORE_60M_JSON))
    config = llama_config(path)
    assert config.max_position_embeddings == 1024  # from max_sequence_length, not the 2048 default
    assert config.pad_token_id is None  # -1 must not become embedding row 31999
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)  # a LLaMA tokenizer's ids
    assert config.to_dict() == llama_config("llama_60m").to_dict()
    assert recipe_for_config(config) == model_spec("llama_60m")
    model = build_model_on_meta(config)
    assert model.model.embed_tokens.padding_idx is None


def test_hf_config_json_file_and_folder(tmp_path):
    hf = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=5, eos_token_id=6, pad_token_id=0,
    )  # fmt: skip
    hf.save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json", str(tmp_path / "config.json")):
        config = llama_config(source)
        assert (config.vocab_size, config.hidden_size, config.num_key_value_heads) == (1000, 64, 2)
        assert config.max_position_embeddings == 128
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (5, 6, 0)
    recipe = recipe_for_config(llama_config(tmp_path))
    assert recipe.name == "custom" and recipe.rank == 16  # a quarter of the width


def test_unknown_name_and_missing_path_raise_value_error_naming_them(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'llama_3b'.*llama_nano.*llama_7b"):
        llama_config("llama_3b")
    with pytest.raises(ValueError, match="llama_3b"):
        model_spec("llama_3b")
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        llama_config(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        llama_config(bad)
    gpt = tmp_path / "gpt.json"
    gpt.write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="gpt2"):
        llama_config(gpt)


def test_llama_7b_on_meta_has_6_74b_parameters_without_allocating():
    model = build_model_on_meta(llama_config("llama_7b"))
    assert count_parameters(model) == 6_738_415_616
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count_parameters(build_model_on_meta(llama_config("llama_60m"))) == 58_073_600


def test_build_model_is_seeded_and_leaves_the_global_rng_alone():
    config = llama_config("llama_nano")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model(config, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model(config, seed=7)
    c = build_model(config, seed=8)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert build_model(config, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()  # untied
