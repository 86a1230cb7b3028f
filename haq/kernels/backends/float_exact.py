"""The int32 accumulator of an int8 GEMM computed exactly with float32 GEMMs: K is cut into chunks
whose partial sums (|value| <= chunk * 127^2 < 2^24) are exact integers in float32; adding the
chunk results is exact below 2^24 and within 1 ulp of float32 above, the precision of the float32
output. Runs anywhere; the fallback where no integer GEMM fits, and on CPUs without int8 dot
products the fastest choice for large M (prefill, calibration)."""
from __future__ import annotations

import torch

from haq.kernels.backends import GemmBackend, register

FP32_EXACT = 2**24
"""Integers up to 2^24 are exact in float32; larger int8 dot products need float64."""
FLOAT_CHUNK = (FP32_EXACT - 1) // (127 * 127)
"""K per float32 GEMM: partial sums stay exact integers (1040)."""


@register("float")
class FloatExact(GemmBackend):
    def available(self, device: torch.device) -> bool:
        return True

    def prepare(self, b: torch.Tensor) -> torch.Tensor:
        return b

    def matmul(self, a: torch.Tensor, packed: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        K, chunk = a.shape[1], FLOAT_CHUNK
        af, bf = a.float(), b.float()
        out = af[:, :chunk] @ bf[:chunk]
        for start in range(chunk, K, chunk):
            out += af[:, start:start + chunk] @ bf[start:start + chunk]
        return out
