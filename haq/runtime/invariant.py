"""Batch-invariant decode: a sequence's logits do not depend on what else is in its batch.

Two things in a batched decode step otherwise depend on the batch:
- float GEMMs: CPU BLAS picks kernels by M, so a row of an [8, K] product differs from the same
  row computed alone in the last bits (measured: 1e-5 at K = 576). Inside this mode every float
  `F.linear` runs in chunks of exactly `ROWS` rows (the last one zero-padded): a row's result then
  comes from the same kernel wherever it sits and whatever the other rows hold (checked).
  The int8 GEMMs need nothing: their integer accumulators are exact.
- attention over a left-padded cache: the padded length changes the reduction order. Decode
  attention (one query token) runs here in float64 with the pads masked, then rounds back.

It costs: an M = 1 float GEMM becomes an M = 16 one (about 2x the time on CPU), so it is opt-in.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

ROWS = 16
NAME = "haq_batch_invariant"


class FixedRowLinears(TorchFunctionMode):
    """Every float F.linear in chunks of ROWS rows."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if not x.is_floating_point():
            return func(*args, **kwargs)
        lead, K = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, K)
        M = rows.shape[0]
        padded = torch.cat([rows, rows.new_zeros((-M) % ROWS, K)]) if M % ROWS else rows
        out = torch.cat([F.linear(chunk, weight, bias) for chunk in padded.split(ROWS)])
        return out[:M].reshape(*lead, -1)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Decode (one query token) in float64 with the pads masked; longer queries as SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(groups, dim=1)
    v = value.double().repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query.double() @ k.transpose(-1, -2)) * scale  # [B, heads, 1, S]
    if attention_mask is not None:
        mask = attention_mask[..., -k.shape[2]:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    out = torch.softmax(scores, dim=-1) @ v  # [B, heads, 1, D]
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention (with SDPA's mask format) under NAME; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
