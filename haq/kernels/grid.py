"""Round-to-nearest symmetric integer quantization: the grid every other method lands on.

Pure tensor math, no modules and no state. Conventions used across haq:

- Symmetric, zero point 0, levels in [-qmax, qmax] with ``qmax = 2**(bits-1) - 1`` (127 for int8;
  -128 is never produced, so negation is exact and the grid is the same for weights and
  activations).
- Weights: one scale per output channel (row of ``W [out, in]``), ``scale = absmax / qmax``.
  This is *not* the IST-DASLab/gptq ``absmax / 127.5`` grid (zero point 128 on [0, 255]); we keep
  the one grid that int8 kernels and compressed-tensors use.
- Activations: one scale per token (every leading index of ``x [..., in]``), dynamic; or one
  per-tensor scale, static (calibrated) or dynamic.
- ``bits`` may be below 8 (e.g. 6 for stress tests, qmax 31); values are still stored in int8.
- Scales are clamped to at least ``SCALE_EPS`` so all-zero rows/tokens give q = 0, not NaN.
"""

from __future__ import annotations

from typing import Literal

import torch

from haq.errors import HaqError

SCALE_EPS = 1e-8
"""Smallest scale: an all-zero row gets this scale and quantizes to zeros instead of 0/0."""

ActMode = Literal["per-token", "per-tensor"]


def qmax_for(bits: int) -> int:
    """Largest level of the symmetric grid, ``2**(bits-1) - 1``; bits must fit in int8 storage."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise HaqError(f"bits must be an integer in [2, 8] (values are stored as int8), got {bits!r}")
    return 2 ** (bits - 1) - 1


def weight_scales(W: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel scales of ``W [out, in]``: ``scale = max_j |W_ij| / qmax``, float32 [out]."""
    if W.dim() != 2:
        raise HaqError(f"weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    qmax = qmax_for(bits)
    absmax = W.detach().abs().amax(dim=1).float()
    return (absmax / qmax).clamp(min=SCALE_EPS)


def quantize_weight(W: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Integer levels ``clamp(round(W / scale), -qmax, qmax)`` of ``W [out, in]`` as int8.

    The clamp matters when ``scale`` was not computed from this ``W`` (GPTQ updates columns
    after the scales are fixed, so its values can leave the grid).
    """
    qmax = qmax_for(bits)
    q = torch.round(W.float() / scale.float().reshape(-1, 1))
    return q.clamp(-qmax, qmax).to(torch.int8)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``qweight * scale`` per row in float32 (float64 if asked), then cast to ``dtype``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (qweight.to(acc) * scale.to(acc).reshape(-1, 1)).to(dtype)


NATIVE_MIN_ELEMENTS = 1 << 14
"""Below this a torch call costs less than crossing into C."""


def _native_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor | None:
    """Row-wise quantize-dequantize by the C kernel (float32 on the CPU), the same values as the
    torch path; None where it cannot run."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() < NATIVE_MIN_ELEMENTS or x.dim() < 1:
        return None
    from haq.kernels.cpu import library

    native = library()
    if native is None:
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    native.haq_fake_quant_rows(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], float(qmax_for(bits)),
                               SCALE_EPS, out.data_ptr())
    return out


def fake_quant_weight(W: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """RTN per-channel quantize-dequantize of ``W``, in ``W``'s dtype (for error measurement)."""
    native = _native_fake_quant(W.detach(), bits) if W.dim() == 2 else None
    if native is not None:
        return native
    scale = weight_scales(W, bits)
    return dequantize_weight(quantize_weight(W, scale, bits), scale, W.dtype)


def quantize_act_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization of ``x [..., in]``: int8 levels and float32 scale [..., 1].

    ``scale_t = max_j |x_tj| / qmax``; a zero token gets ``SCALE_EPS`` and all-zero levels.
    """
    qmax = qmax_for(bits)
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=SCALE_EPS)
    q = torch.round(xf / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def quantize_act_per_tensor(
    x: torch.Tensor, bits: int = 8, static_scale: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor quantization: int8 levels and a float32 scalar scale.

    With ``static_scale`` (calibrated; clamped to >= ``SCALE_EPS``), values beyond
    ``qmax * scale`` saturate; without it the scale is the dynamic ``max |x| / qmax`` of this tensor.
    """
    qmax = qmax_for(bits)
    xf = x.float()
    if static_scale is None:
        scale = (xf.abs().amax() / qmax).clamp(min=SCALE_EPS)
    else:
        # clamp, not check: a data-dependent check would sync the device on every call
        scale = torch.as_tensor(static_scale, dtype=torch.float32, device=x.device).reshape(()).clamp(min=SCALE_EPS)
    q = torch.round(xf / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def quantize_act(
    x: torch.Tensor,
    bits: int = 8,
    mode: ActMode = "per-token",
    static_scale: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation levels and scale as the recipe's mode says: per token [..., 1], or per tensor."""
    if mode == "per-token":
        if static_scale is not None:
            raise HaqError("a static activation scale is only meaningful with act_mode='per-tensor'")
        return quantize_act_per_token(x, bits)
    if mode == "per-tensor":
        return quantize_act_per_tensor(x, bits, static_scale)
    raise HaqError(f"act_mode must be 'per-token' or 'per-tensor', got {mode!r}")


def fake_quant_act(
    x: torch.Tensor,
    bits: int = 8,
    mode: ActMode = "per-token",
    static_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Activation quantize-dequantize in ``x``'s dtype, as the int8 kernel would see ``x``."""
    if mode == "per-token" and static_scale is None:
        native = _native_fake_quant(x.detach(), bits)
        if native is not None:
            return native
    q, scale = quantize_act(x, bits, mode, static_scale)
    return (q.float() * scale).to(x.dtype)
