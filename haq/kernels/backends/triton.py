"""Triton's int8 kernels (:mod:`haq.kernels.triton_int8`): on CUDA, or on the CPU under
``TRITON_INTERPRET=1`` (the tests). The linear is one fused kernel for dynamic per-token
activations; other activation modes quantize first and use the exact integer GEMM."""
from __future__ import annotations

import torch

from haq.kernels import triton_int8
from haq.kernels.backends import ActQuant, GemmBackend, register


@register("triton")
class Triton(GemmBackend):
    def available(self, device: torch.device) -> bool:
        return triton_int8.available(device)

    def prepare(self, b: torch.Tensor) -> torch.Tensor:
        return b

    def matmul(self, a: torch.Tensor, packed: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(a.shape[0], device=a.device)
        return triton_int8.w8a8_grouped(a, ones, [a.shape[0]], b.t()[None], torch.ones(1, b.shape[1], device=a.device))

    def linear(self, x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, act: ActQuant) -> torch.Tensor:
        if act.mode == "per-token" and act.static_scale is None:
            return triton_int8.w8a8_linear(x, b.t(), w_scale, bias, act.bits)
        return super().linear(x, packed, b, w_scale, bias, act)
