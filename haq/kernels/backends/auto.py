"""Per call, the fastest exact backend for the device, the instruction set and the shape.

CUDA: ``int_mm`` where its K/N constraints hold, else ``float`` with a one-time warning per shape.
CPU, ms per call on this project's 2-core AVX-512 Xeon without VNNI, torch 2.13:

    M x K x N              fp32 nn.Linear   float path   fbgemm
    1 x 4096 x 14336           19.5           172          4.0
    16 x 4096 x 14336          57.1           210         22.2
    1 x 576 x 3072              0.39          1.78         0.33
    16 x 576 x 3072             2.94          3.53         1.05
    128 x 4096 x 4096            -            100          35
    512 x 4096 x 4096            -            185         198
    512 x 576 x 1536             -            6.6          8.5

FBGEMM wins at decode-sized M and, while the float path needs several K chunks, up to a few
hundred rows; the float path wins for large M. With VNNI, FBGEMM still beats ``torch._int_mm`` up
to 32 rows (M=16, 4096 x 4096: 0.98 vs 1.78 ms on a 2-core EPYC, bench/results/kernels-epyc-vnni.md)
and ``torch._int_mm`` runs above.
"""
from __future__ import annotations

import warnings

import torch

from haq.kernels import cpu
from haq.kernels.backends import ActQuant, get_backend, prepared, register
from haq.kernels.backends.fbgemm import cpu_has_int8_dot, has_fbgemm
from haq.kernels.backends.float_exact import FLOAT_CHUNK
from haq.kernels.backends.int_mm import int_mm_supports

NATIVE_MAX_M = 8
"""haq's own fused kernel up to this many rows. Alone, weights in cache (1 thread, 576 x 3072 and
1536 x 576, the smollm2 expert shapes) it is 1.3-2x FBGEMM at M = 1 and even at 2-8; with cold
weights (30 of 576 x 960) 57 vs 84 us at M = 1, about even at 2-8, behind at 16. In the engine at
batch 8 (smollm2-8x135m int8, 1 thread) it cut the fused q/k/v from 9.2 to 4.7-5.1 ms per step and
o_proj from 4.5 to 2.6-2.8 ms (FBGEMM's path quantizes and rescales with PyTorch ops around it)."""
FBGEMM_MAX_M = 32
"""On CPUs "auto" runs FBGEMM up to this many rows (measured above, with and without VNNI) ..."""
FBGEMM_MAX_M_LONG_K = 256
"""... and, without VNNI, up to this many when K is long enough for the float path to need several chunks."""

def native_available() -> bool:
    return cpu.library() is not None


_warned_shapes: set[tuple[str, int, int]] = set()  # (device type, K, N) already warned about


def cpu_auto_impl(M: int = 1, K: int = 0) -> str:
    """The backend "auto" runs on this CPU for an [M, K] @ [K, N] product."""
    if M <= NATIVE_MAX_M and native_available():
        return "native"
    if cpu_has_int8_dot():  # FBGEMM's packed GEMM still wins at decode-sized M (2x at M=16 on an EPYC)
        return "fbgemm" if has_fbgemm() and M <= FBGEMM_MAX_M else "int_mm"
    small = M <= FBGEMM_MAX_M or (K > FLOAT_CHUNK and M <= FBGEMM_MAX_M_LONG_K)
    return "fbgemm" if has_fbgemm() and small else "float"


def choose(a: torch.Tensor, b: torch.Tensor) -> str:
    """The backend "auto" uses for a [M, K] @ b [K, N] on a's device."""
    if a.device.type == "cpu":
        return cpu_auto_impl(*a.shape)
    K, N = b.shape
    if int_mm_supports(a.device, K, N):
        return "int_mm"
    key = (a.device.type, K, N)
    if key not in _warned_shapes:
        _warned_shapes.add(key)
        warnings.warn(f"torch._int_mm cannot run K={K}, N={N} on {a.device.type}; "
                      "using an exact float GEMM of the int8 values instead (slower)", stacklevel=4)
    return "float"


@register("auto")
class Auto:
    packs = False  # the chosen backend prepares (and caches) its own layout

    def available(self, device: torch.device) -> bool:
        return True

    def prepare(self, b: torch.Tensor) -> torch.Tensor:
        return b

    def matmul(self, a: torch.Tensor, packed: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        backend = get_backend(choose(a, b))
        return backend.matmul(a, prepared(backend, b), b)

    def linear(self, x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, act: ActQuant) -> torch.Tensor:
        backend = get_backend(choose(x, b))  # the chosen backend's own linear, fused or not
        return backend.linear(x, prepared(backend, b), b, w_scale, bias, act)
