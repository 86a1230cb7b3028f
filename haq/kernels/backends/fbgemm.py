"""FBGEMM's packed int8 GEMM (x86 CPU builds of PyTorch), exact for 8-bit activations.

With VNNI (or AMX) the int8 activations go in as u8 with zero point 128 in one pass: the products
accumulate in int32 (checked exact at the extremes of both ranges). On CPUs without int8 dot products FBGEMM multiplies u8 x s8 pairs with ``vpmaddubsw``, whose int16
pair sums saturate for 8-bit activations (a single pass with zero point 128 was off by 10-50% of
the output range, measured); PyTorch's dynamic quantization avoids it with 7-bit activations.
Here the int8 activations are split into their positive and negative parts, each in [0, 128]:
with any int8 weight a pair sum lies in [-2 * 128 * 128, 2 * 128 * 127], inside int16, so both
halves, computed in one stacked GEMM, are exact, and their difference is the int8 product. It
costs twice the rows of a plain GEMM (bench/results/kernels.md has the speed against fp32).
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from haq.errors import HaqError
from haq.kernels.backends import GemmBackend, register


@functools.lru_cache(maxsize=1)
def has_fbgemm() -> bool:
    """Whether this PyTorch has FBGEMM's quantized linear (x86 builds; PyTorch has deprecated its
    quantized tensors, so a future build may not, and "auto" then falls back to "float")."""
    return ("fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"))


@functools.lru_cache(maxsize=1)
def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX). Without them
    ``torch._int_mm`` on CPU is 50-80x slower than an fp32 GEMM, so "auto" then never uses it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


@register("fbgemm")
class Fbgemm(GemmBackend):
    packs = True

    def available(self, device: torch.device) -> bool:
        return device.type == "cpu" and has_fbgemm()

    def prepare(self, b: torch.Tensor):
        w = b.t().contiguous()  # [N, K], the layout FBGEMM packs
        N = w.shape[0]
        with warnings.catch_warnings():  # the quantized-tensor deprecation notice, once per weight
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(w, torch.ones(N, dtype=torch.double),
                                                          torch.zeros(N, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)

    def matmul(self, a: torch.Tensor, packed, b: torch.Tensor) -> torch.Tensor:
        if not self.available(a.device):
            raise HaqError("impl='fbgemm' needs a CPU build of PyTorch with FBGEMM (x86); use 'auto' or 'float'")
        af = a.float()
        if cpu_has_int8_dot():  # vpdpbusd accumulates u8 x s8 in int32: one pass with zero point 128 is exact
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(af, 1.0, 128, packed)
        M = a.shape[0]
        stacked = torch.cat([af.clamp(min=0), (-af).clamp(min=0)])  # [2M, K], integers in [0, 128]
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(stacked, 1.0, 0, packed)
        return out[:M] - out[M:]
