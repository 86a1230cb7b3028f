"""Tiny random configs of every supported architecture, built in seconds, for unit tests."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 4096  # matches the bundled tiny-mixtral tokenizer, which these models reuse

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)),
    "tiny-mixtral-random": ("MixtralConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  num_local_experts=4, num_experts_per_tok=2)),
    "tiny-opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=64, max_position_embeddings=2048)),
    "tiny-qwen2-moe": ("Qwen2MoeConfig", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                                              shared_expert_intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                              num_experts_per_tok=2, decoder_sparse_step=1)),
    "tiny-qwen3-moe": ("Qwen3MoeConfig", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=16, num_experts=4, num_experts_per_tok=2,
                                              decoder_sparse_step=1)),
}


def build_tiny(name: str, out: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, config_cls_name)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.config.name_or_path = name
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
