"""``torch._int_mm(a [M, K] int8, b [K, N] int8) -> int32 [M, N]``, constraints (torch 2.13):
- CPU: any M, K, N (including 0 and odd sizes), any strides; a slow generic loop without
  VNNI/AMX (~50-80x an fp32 GEMM), fast with them.
- CUDA (checked on an H200, torch 2.11): M > 16 ("self.size(0) needs to be greater than 16"),
  K and N > 0 and multiples of 8; B may be row- or column-major. M is zero-padded up to 17.
"""
from __future__ import annotations

import torch

from haq.errors import HaqError
from haq.kernels.backends import GemmBackend, register

CUDA_MIN_M = 17
"""cuBLASLt int8 GEMM in torch._int_mm needs M > 16; smaller batches are zero-padded to this."""
CUDA_KN_MULTIPLE = 8
"""torch._int_mm on CUDA needs K and N to be multiples of 8."""


def int_mm_supports(device: torch.device, K: int, N: int) -> bool:
    """Whether ``torch._int_mm`` accepts a [*, K] @ [K, N] product on `device` (M padding aside)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return K > 0 and N > 0 and K % CUDA_KN_MULTIPLE == 0 and N % CUDA_KN_MULTIPLE == 0
    return False


@register("int_mm")
class IntMM(GemmBackend):
    def available(self, device: torch.device) -> bool:
        return device.type in ("cpu", "cuda")

    def prepare(self, b: torch.Tensor) -> torch.Tensor:
        return b

    def matmul(self, a: torch.Tensor, packed: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        K, N = b.shape
        if not int_mm_supports(a.device, K, N):
            raise HaqError(f"torch._int_mm does not support K={K}, N={N} on {a.device.type} "
                           f"(CUDA needs multiples of {CUDA_KN_MULTIPLE}); use impl='auto' or 'float'")
        M = a.shape[0]
        if a.device.type == "cuda" and M < CUDA_MIN_M:
            a = torch.cat([a, a.new_zeros(CUDA_MIN_M - M, K)])
        return torch._int_mm(a, b)[:M].float()
