"""Decode steps of llama-layout attention in one kernel call (`haq_decode_attention` in
haq/kernels/cpu): RoPE on q and k, the new keys and values written into the preallocated cache,
and grouped-query attention of every row over its own columns. A decode step through HF's module
is some 30 tensor ops and their Python around the two projections, more time than the
projections themselves; here it is the projections (one fused int8 GEMM for q/k/v where the
checkpoint is int8) and one call.

Installed per attention module (its `forward` is wrapped, its submodules and paths unchanged);
anything but a float32 CPU decode step on a preallocated cache with known left padding (prefill,
other dtypes or devices, the batch-invariant attention, sliding windows) runs the module's own
forward. Same function as HF's SDPA path up to float rounding (the softmax's order and expf).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from haq.kernels import cpu
from haq.runtime.kv_cache import PreallocatedLayer

SUPPORTED = {"LlamaAttention", "MixtralAttention", "MistralAttention", "Qwen2Attention", "Qwen2MoeAttention"}
"""Attention classes whose forward is exactly: q/k/v projections, RoPE, cache update, softmax
attention (GQA), o projection."""
PLAIN_ATTENTION = ("sdpa", "eager")
MAX_HEAD_DIM = 512  # the kernel's per-head stack buffers


def install(model: nn.Module) -> int:
    """Wrap every supported attention module of `model` (once); the number wrapped."""
    if cpu.library() is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module).__name__ in SUPPORTED and not getattr(module, "_haq_decode", False):
            if getattr(module.config, "sliding_window", None) and getattr(module.config, "use_sliding_window", True):
                continue
            if module.head_dim > MAX_HEAD_DIM:
                continue
            shape = (module.config.num_attention_heads, module.config.num_key_value_heads, module.head_dim)
            module.forward = functools.partial(_forward, module, module.forward, shape)
            module._haq_decode = True
            count += 1
    return count


def _forward(attn: nn.Module, original, shape: tuple[int, int, int], hidden_states: torch.Tensor,
             position_embeddings, attention_mask, past_key_values=None, **kwargs):
    """`shape`: (query heads, key-value heads, head dim), read once (HF config reads are slow)."""
    pads = getattr(past_key_values, "haq_pads", None)
    B = hidden_states.shape[0]
    if (past_key_values is None or hidden_states.dim() != 3 or hidden_states.shape[1] != 1
            or hidden_states.dtype != torch.float32 or hidden_states.device.type != "cpu"
            or attn.config._attn_implementation not in PLAIN_ATTENTION
            or (pads is None and not (B == 1 and attention_mask is None)) or (pads is not None and len(pads) != B)):
        return original(hidden_states, position_embeddings, attention_mask, past_key_values=past_key_values, **kwargs)
    layer = past_key_values.layers[attn.layer_idx]
    if not isinstance(layer, PreallocatedLayer) or layer.keys is None or layer.keys.dtype != torch.float32 \
            or layer.get_seq_length() == 0:
        return original(hidden_states, position_embeddings, attention_mask, past_key_values=past_key_values, **kwargs)
    q, k, v = attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)
    q, k, v = (t.float() if t.stride(-1) == 1 else t.float().contiguous() for t in (q, k, v))
    if k.stride(0) != v.stride(0):
        k, v = k.contiguous(), v.contiguous()
    cos, sin = (t.float().reshape(B, -1).contiguous() for t in position_embeddings)
    heads, kv_heads, head_dim = shape
    kbuf, vbuf, length = layer.reserve(1)
    pad = torch.tensor(pads if pads is not None else [0], dtype=torch.int64)
    out = torch.empty(B, 1, heads * head_dim, dtype=torch.float32)
    cpu.library().haq_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), B, heads, kv_heads, head_dim,
        cos.data_ptr(), sin.data_ptr(), kbuf.data_ptr(), vbuf.data_ptr(), kbuf.shape[-2], length, pad.data_ptr(),
        attn.scaling, out.data_ptr(), torch.get_num_threads())
    layer.advance(1)
    return attn.o_proj(out), None
