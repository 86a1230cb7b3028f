"""Tiny random configs of every supported architecture, built in seconds, for unit tests."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 4096  # matches the bundled tiny-mixtral tokenizer, which these models reuse
# DeepSeek-V2/V3: MLA, one dense first layer, shared + 4 routed experts (the families differ in router and query)
DEEPSEEK = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=4,
                num_experts_per_tok=2, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                max_position_embeddings=2048)

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
    # DeepSeek-V2: a low-rank query, 2 shared experts
    "tiny-deepseek-v2": ("DeepseekV2Config", dict(DEEPSEEK, n_shared_experts=2, q_lora_rank=32)),
    # DeepSeek-V3: sigmoid router with a correction bias and group-limited top-k; full-rank query
    "tiny-deepseek-v3": ("DeepseekV3Config", dict(DEEPSEEK, n_shared_experts=1, n_group=2, topk_group=1,
                                                  q_lora_rank=None)),
    # Gemma3 (text): x * (1 + w) norms, sliding-window and global layers with their own masks and rotary
    "tiny-gemma3": ("Gemma3TextConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             query_pre_attn_scalar=16, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"] * 2,
                                             max_position_embeddings=2048,
                                             # Gemma normalizes each block's output before the residual
                                             # add: at the default init (0.02) that output is ~1e-3 and the
                                             # post-norm magnifies rounding ~500x; 0.1 gives it unit scale
                                             initializer_range=0.1)),
}


def build_tiny(name: str, out: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, config_cls_name)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():  # Gemma-style norms start at w = 0 (gain 1): perturb every norm, so a fold that
        for name, param in model.named_parameters():  # treats the kind wrongly changes the function
            if param.dim() == 1 and "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.config.name_or_path = name
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
