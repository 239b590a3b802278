"""The tiny LLaMA that the gnlorp-train tests run (4.2M parameters, seconds per run)."""

TINY_JSON = {
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
}  # fmt: skip


def tiny_args(tiny_config: str, out, *extra: str) -> list[str]:
    """gnlorp-train flags of a 3-step run of the tiny model (its JSON at ``tiny_config``)."""
    return [
        "--model-config", tiny_config, "--seq-len", "32", "--batch-size", "2", "--max-steps", "3",
        "--eval-batches", "1", "--output-dir", str(out), "--no-progress", "--log-every", "1",
        *extra,
    ]  # fmt: skip


def small_llama(
    *, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int, **extra
):
    """A randomly initialised LLaMA (4 heads, untied head, no pad token) of the given sizes, built
    under the current torch seed."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=None,
        **extra,
    )
    return LlamaForCausalLM(config)
