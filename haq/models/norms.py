"""What a norm computes, as data: every fold that moves a per-channel factor into or out of a norm
(smoothing, rotation, outlier injection) goes through `norm_gain` / `set_norm_gain`, so a norm
that computes x * (1 + w) is never edited as if it computed x * w.

  rms         y = x / rms(x) * w              Llama, Mistral, Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3
  rms_offset  y = x / rms(x) * (1 + w)        Gemma 2/3 (weights stored as an offset from 1)
  layernorm   y = (x - mean) / std * w + b    OPT (subtracts the mean: no residual rotation)
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from haq.errors import HaqError

NormKind = Literal["rms", "rms_offset", "layernorm"]
FORMULAS: dict[str, str] = {"rms": "x / rms(x) * w", "rms_offset": "x / rms(x) * (1 + w)",
                            "layernorm": "(x - mean) / std * w + b"}


def norm_gain(norm: nn.Module, kind: NormKind) -> torch.Tensor:
    """The per-channel factor the norm multiplies by (w, or 1 + w), in the weight's dtype."""
    w = norm.weight.data
    return w + 1 if kind == "rms_offset" else w


def set_norm_gain(norm: nn.Module, kind: NormKind, gain: torch.Tensor) -> None:
    """Make the norm multiply by `gain` per channel (its bias, if any, is the caller's)."""
    norm.weight.data = (gain - 1 if kind == "rms_offset" else gain).to(norm.weight.dtype)


def _eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, attr, None), float):
            return getattr(norm, attr)
    return 1e-6


def _expected(norm: nn.Module, kind: NormKind, x: torch.Tensor) -> torch.Tensor:
    w = norm.weight.detach().float()
    if kind == "layernorm":
        bias = getattr(norm, "bias", None)
        return F.layer_norm(x, (x.shape[-1],), w, None if bias is None else bias.detach().float(), _eps(norm))
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(norm))
    return xn * (1 + w if kind == "rms_offset" else w)


@torch.no_grad()
def check_norm(norm: nn.Module, kind: NormKind, where: str) -> None:
    """Fail clearly unless `norm` computes what `kind` says (checked on random inputs), so a fold
    can never silently write wrong weights into a norm of another kind."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise HaqError(f"{where}: {type(norm).__name__} has no per-channel weight; haq can fold scales only into "
                       f"norms that compute {FORMULAS[kind]}")
    if not bool(torch.isfinite(weight).all()):
        raise HaqError(f"NaN or Inf in the weights of {where}; check the model weights")
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device)
    got = norm(x.to(weight.dtype)).float()
    expected = _expected(norm, kind, x)
    tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tol, atol=tol * float(expected.abs().max())):
        raise HaqError(f"{where}: {type(norm).__name__} does not compute {FORMULAS[kind]} as this architecture's "
                       f"adapter expects; folding smoothing or rotation into it would be wrong "
                       f"(haq.models.adapters describes each family's norms)")
