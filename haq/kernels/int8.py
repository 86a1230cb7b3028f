"""Real W8A8 inference: int8 x int8 -> int32 GEMM (``torch._int_mm``) with float rescaling.

This module runs already-quantized weights; it never chooses them (that is :mod:`haq.quant`).
The activation grid is the one of :mod:`haq.kernels.grid` (symmetric, [-qmax, qmax]), so
``int8_linear`` equals ``fake_quant_act(x) @ (qweight * w_scale)^T`` up to float rounding.

Weight layout: ``qweight`` is stored [out, in] = [N, K] contiguous (nn.Linear's layout, which
checkpoints and compressed-tensors use) and handed to ``torch._int_mm`` as the transposed view
``qweight.t()`` ([K, N], column-major). It is never slower, usually much faster (ms per call):

    where                                 M x K x N          [K, N] contig.  [N, K].t() view  float GEMM
    H200, torch 2.11+cu130                17 x 4096 x 4096       0.115          0.017        0.025 (fp16)
                                         2048 x 4096 x 4096      0.550          0.082        0.085 (fp16)
    Xeon with AMX/VNNI, 16 thr, 2.11      1 x 4096 x 4096        1.00           0.157        0.82 (fp32)
                                           32 x 4096 x 4096      0.50           0.25         3.39 (fp32)
    Xeon AVX-512, no VNNI, 1 thr, 2.13  128 x 2048 x 2048       2556           1166          32 (fp32)
                                          128 x 576 x 1536       175            171           2.1 (fp32)

On a CPU without VNNI/AMX ``torch._int_mm`` is a slow generic loop (~50-80x an fp32 GEMM).
There "auto" picks per call between FBGEMM's u8 x s8 GEMM (``impl="fbgemm"``, see
:func:`_fbgemm_matmul_exact`) and ``impl="float"``, the same int32 accumulator computed exactly
with float GEMMs. ms per call on this project's 2-core AVX-512 Xeon (no VNNI), torch 2.13:

    M x K x N              fp32 nn.Linear   float path   fbgemm
    1 x 4096 x 14336           19.5           172          4.0
    16 x 4096 x 14336          57.1           210         22.2
    1 x 576 x 3072              0.39          1.78         0.33
    16 x 576 x 3072             2.94          3.53         1.05
    128 x 4096 x 4096            -            100          35
    512 x 4096 x 4096            -            185         198
    512 x 576 x 1536             -            6.6          8.5

FBGEMM wins at decode-sized M and, while the float path needs several K chunks, up to a few
hundred rows; the float path wins for large M (prefill, calibration). With VNNI, FBGEMM still
beats ``torch._int_mm`` up to 32 rows (M=16, 4096 x 4096: 0.98 vs 1.78 ms on a 2-core EPYC,
bench/results/kernels-epyc-vnni.md), and ``torch._int_mm`` runs above.

``torch._int_mm(a [M, K] int8, b [K, N] int8) -> int32 [M, N]`` constraints (torch 2.13):
- CPU: any M, K, N (including 0 and odd sizes), any strides.
- CUDA (checked on an H200, torch 2.11): M > 16 ("self.size(0) needs to be greater than 16"),
  K and N > 0 and multiples of 8 ("self.size(1)/mat2.size(1) needs to be greater than 0 and a
  multiple of 8"); B may be row- or column-major. We pad M up to 17 with zero rows; if K or N is
  not a multiple of 8 we use the exact float path and warn once per shape.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from haq.errors import HaqError
from haq.kernels.grid import ActMode, qmax_for, quantize_act_per_tensor, quantize_act_per_token, quantize_weight, weight_scales

MatmulImpl = Literal["auto", "int_mm", "fbgemm", "float"]

CUDA_MIN_M = 17
"""cuBLASLt int8 GEMM in torch._int_mm needs M > 16; smaller batches are zero-padded to this."""
CUDA_KN_MULTIPLE = 8
"""torch._int_mm on CUDA needs K and N to be multiples of 8."""
_FP32_EXACT = 2**24
"""Integers up to 2^24 are exact in float32; larger int8 dot products need float64."""
_FLOAT_CHUNK = (_FP32_EXACT - 1) // (127 * 127)
"""K per float32 GEMM in the float path: partial sums stay exact integers (1040)."""

_warned_shapes: set[tuple[str, int, int]] = set()  # (device type, K, N) already warned about


@functools.lru_cache(maxsize=1)
def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX). Without them
    ``torch._int_mm`` on CPU is 50-80x slower than an fp32 GEMM (measured above), so "auto" then
    never uses it (:func:`cpu_auto_impl`)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


@functools.lru_cache(maxsize=1)
def has_fbgemm() -> bool:
    """Whether this PyTorch has FBGEMM's quantized linear (x86 builds; PyTorch has deprecated its
    quantized tensors, so a future build may not, and "auto" then falls back to "float")."""
    return ("fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"))


FBGEMM_MAX_M = 32
"""On CPUs "auto" runs FBGEMM up to this many rows (measured above, with and without VNNI) ..."""
FBGEMM_MAX_M_LONG_K = 256
"""... and, without VNNI, up to this many when K is long enough for the float path to need several chunks."""


def cpu_auto_impl(M: int = 1, K: int = 0) -> MatmulImpl:
    """The int8 GEMM "auto" runs on this CPU for an [M, K] @ [K, N] product."""
    if cpu_has_int8_dot():  # FBGEMM's packed GEMM still wins at decode-sized M (2x at M=16 on an EPYC)
        return "fbgemm" if has_fbgemm() and M <= FBGEMM_MAX_M else "int_mm"
    small = M <= FBGEMM_MAX_M or (K > _FLOAT_CHUNK and M <= FBGEMM_MAX_M_LONG_K)
    return "fbgemm" if has_fbgemm() and small else "float"


_packed: dict[int, tuple[weakref.ref, dict]] = {}
"""FBGEMM-packed weights by id of the tensor that owns the int8 storage (tensors compare by
value, so no WeakKeyDictionary), then by the view (offset, shape, strides) and the owner's
version: packing costs about one GEMM, so it is done once per weight; an entry goes when its
weight is freed or rewritten."""


def _fbgemm_packed(b: torch.Tensor):
    owner = b._base if b._base is not None else b
    key = (b.storage_offset(), tuple(b.shape), b.stride(), owner._version)
    entry = _packed.get(id(owner))
    if entry is None or entry[0]() is not owner:
        entry = (weakref.ref(owner, lambda _ref, i=id(owner): _packed.pop(i, None)), {})
        _packed[id(owner)] = entry
    views = entry[1]
    if key not in views:
        for stale in [k for k in views if k[:3] == key[:3]]:
            del views[stale]
        w = b.t().contiguous()  # [N, K], the layout FBGEMM packs
        N = w.shape[0]
        with warnings.catch_warnings():  # the quantized-tensor deprecation notice, once per weight
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(w, torch.ones(N, dtype=torch.double),
                                                          torch.zeros(N, dtype=torch.long), 0)
        views[key] = torch.ops.quantized.linear_prepack(qw, None)
    return views[key]


def _fbgemm_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` through FBGEMM's int8 GEMM, exact on CPUs without int8 dot products.

    There FBGEMM multiplies u8 x s8 pairs with ``vpmaddubsw``, whose int16 pair sums saturate
    for 8-bit activations (a single pass with zero point 128 was off by 10-50% of the output
    range, measured); PyTorch's dynamic quantization avoids it with 7-bit activations. Here the
    int8 activations are split into their positive and negative parts, each in [0, 128]: with any
    int8 weight a pair sum lies in [-2 * 128 * 128, 2 * 128 * 127], inside int16, so both halves,
    computed in one stacked GEMM, are exact, and their difference is the int8 product. It costs
    twice the rows of a plain GEMM (bench/results/kernels.md has the speed against fp32).
    """
    M = a.shape[0]
    af = a.float()
    stacked = torch.cat([af.clamp(min=0), (-af).clamp(min=0)])  # [2M, K], integers in [0, 128]
    out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(stacked, 1.0, 0, _fbgemm_packed(b))
    return out[:M] - out[M:]


def _int_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._int_mm`` accepts these operands on their device (M padding aside)."""
    K, N = b.shape
    if a.device.type == "cpu":
        return True
    if a.device.type == "cuda":
        return K > 0 and N > 0 and K % CUDA_KN_MULTIPLE == 0 and N % CUDA_KN_MULTIPLE == 0
    return False


def _float_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of int8 operands through float32 GEMMs: K is cut into chunks whose partial sums
    (|value| <= chunk * 127^2 < 2^24) are exact integers in float32; adding the chunk results
    is exact below 2^24 and within 1 ulp of float32 above, the precision of the float32 output."""
    K, chunk = a.shape[1], _FLOAT_CHUNK
    af, bf = a.float(), b.float()
    out = af[:, :chunk] @ bf[:chunk]
    for start in range(chunk, K, chunk):
        out += af[:, start:start + chunk] @ bf[start:start + chunk]
    return out


def int8_matmul(a: torch.Tensor, b: torch.Tensor, impl: MatmulImpl = "auto") -> torch.Tensor:
    """Exact integer product of int8 ``a [M, K]`` and ``b [K, N]``, returned as float32 [M, N].

    ``impl``: "int_mm" uses ``torch._int_mm`` (error if the shape is unsupported), "float" the
    exact float GEMM, "auto" ``torch._int_mm`` where supported and the float GEMM otherwise (with a
    one-time warning per shape), "fbgemm" FBGEMM's int8 GEMM (x86 CPUs).
    On a CPU, "auto" picks by shape and instruction set (:func:`cpu_auto_impl`).
    Float32 output is exact up to |value| 2^24, and within 1 ulp beyond.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise HaqError(
            f"int8_matmul needs int8 [M, K] @ [K, N]; got {a.dtype} {tuple(a.shape)} @ {b.dtype} {tuple(b.shape)}"
        )
    if impl == "auto" and a.device.type == "cpu":
        impl = cpu_auto_impl(*a.shape)
    if impl == "float":
        return _float_matmul_exact(a, b).float()
    if impl == "fbgemm":
        if a.device.type != "cpu" or not has_fbgemm():
            raise HaqError("impl='fbgemm' needs a CPU build of PyTorch with FBGEMM (x86); use 'auto' or 'float'")
        return _fbgemm_matmul_exact(a, b)
    if impl not in ("auto", "int_mm"):
        raise HaqError(f"impl must be 'auto', 'int_mm', 'fbgemm' or 'float', got {impl!r}")
    if not _int_mm_supported(a, b):
        if impl == "int_mm":
            raise HaqError(
                f"torch._int_mm does not support K={b.shape[0]}, N={b.shape[1]} on {a.device.type} "
                f"(CUDA needs multiples of {CUDA_KN_MULTIPLE}); use impl='auto' or 'float'"
            )
        key = (a.device.type, b.shape[0], b.shape[1])
        if key not in _warned_shapes:
            _warned_shapes.add(key)
            warnings.warn(
                f"torch._int_mm cannot run K={b.shape[0]}, N={b.shape[1]} on {a.device.type}; "
                "using an exact float GEMM of the int8 values instead (slower)",
                stacklevel=3,
            )
        return _float_matmul_exact(a, b).float()
    M = a.shape[0]
    if a.device.type == "cuda" and M < CUDA_MIN_M:
        a = torch.cat([a, a.new_zeros(CUDA_MIN_M - M, a.shape[1])])
    return torch._int_mm(a, b)[:M].float()


def int8_linear(
    x: torch.Tensor,
    qweight_t: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_bits: int = 8,
    act_mode: ActMode = "per-token",
    static_act_scale: torch.Tensor | float | None = None,
    impl: MatmulImpl = "auto",
) -> torch.Tensor:
    """``y = x W^T + b`` with int8 activations and weights; returns ``x``'s dtype, shape [..., N].

    ``qweight_t`` is the int8 weight as [K, N] (pass ``qweight.t()`` of the [N, K] storage);
    ``w_scale`` [N] its per-output-channel scales. ``x [..., K]`` is quantized per token
    (dynamic), or per tensor (``static_act_scale`` if given, else dynamic). Then
    ``y = (xq @ wq^T) * x_scale * w_scale + b``, the GEMM in int32.
    """
    K, N = qweight_t.shape
    if x.shape[-1] != K:
        raise HaqError(f"input has {x.shape[-1]} features, int8 weight expects {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if act_mode == "per-token":
        if static_act_scale is not None:
            raise HaqError("static_act_scale needs act_mode='per-tensor'")
        xq, x_scale = quantize_act_per_token(x2, act_bits)  # [M, 1]
    elif act_mode == "per-tensor":
        xq, x_scale = quantize_act_per_tensor(x2, act_bits, static_act_scale)  # scalar
    else:
        raise HaqError(f"act_mode must be 'per-token' or 'per-tensor', got {act_mode!r}")
    acc = int8_matmul(xq, qweight_t, impl)  # [M, N], exact integers
    y = acc * x_scale * w_scale.float().reshape(1, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, N)


class Int8Linear(nn.Module):
    """Drop-in W8A8 replacement for ``nn.Linear`` (inference only).

    Buffers: ``qweight`` int8 [out, in], ``w_scale`` float32 [out], optional ``bias`` [out] and
    optional ``input_scale`` (float32 scalar, static per-tensor activation scale).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        act_bits: int = 8,
        act_mode: ActMode = "per-token",
        static_input_scale: bool = False,
        impl: MatmulImpl = "auto",
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        qmax_for(act_bits)  # validates
        if act_mode not in ("per-token", "per-tensor"):
            raise HaqError(f"act_mode must be 'per-token' or 'per-tensor', got {act_mode!r}")
        if static_input_scale and act_mode != "per-tensor":
            raise HaqError("a static input scale needs act_mode='per-tensor'")
        self.in_features = in_features
        self.out_features = out_features
        self.act_bits = act_bits
        self.act_mode: ActMode = act_mode
        self.impl: MatmulImpl = impl
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.register_buffer(
            "input_scale", torch.ones((), dtype=torch.float32, device=device) if static_input_scale else None
        )
        # x -> x R before quantizing (haq.kernels.rotation.OnlineRotation; qweight then holds W R)
        self.online_rotation: nn.Module | None = None

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        bits: int = 8,
        scale: torch.Tensor | None = None,
        qweight: torch.Tensor | None = None,
        act_bits: int = 8,
        act_mode: ActMode = "per-token",
        input_scale: torch.Tensor | float | None = None,
        impl: MatmulImpl = "auto",
    ) -> Int8Linear:
        """Build from a float linear: RTN per channel by default; or with given ``scale`` (and
        ``qweight``, e.g. a GPTQ result, in which case ``scale`` is required)."""
        W = linear.weight.detach()
        if qweight is not None and scale is None:
            raise HaqError("from_float: a precomputed qweight needs its scale")
        if scale is None:
            scale = weight_scales(W, bits)
        if qweight is None:
            qweight = quantize_weight(W, scale, bits)
        if qweight.shape != W.shape or qweight.dtype != torch.int8:
            raise HaqError(f"qweight must be int8 {tuple(W.shape)}, got {qweight.dtype} {tuple(qweight.shape)}")
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            act_bits=act_bits,
            act_mode=act_mode,
            static_input_scale=input_scale is not None,
            impl=impl,
            device=W.device,
            bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32,
        )
        mod.qweight.copy_(qweight)
        mod.w_scale.copy_(scale.reshape(-1))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        if input_scale is not None:
            mod.input_scale.copy_(torch.as_tensor(input_scale, dtype=torch.float32))
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online_rotation is not None:
            x = self.online_rotation(x)
        return int8_linear(
            x, self.qweight.t(), self.w_scale, self.bias, self.act_bits, self.act_mode, self.input_scale, self.impl
        )

    def extra_repr(self) -> str:
        static = ", static input scale" if self.input_scale is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"act_bits={self.act_bits}, act_mode={self.act_mode}{static}, impl={self.impl}"
        )
