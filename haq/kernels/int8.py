"""Real W8A8 inference: int8 x int8 -> int32 GEMM with float rescaling, on a registered int8
backend (:mod:`haq.kernels.backends`: float-exact, FBGEMM, ``torch._int_mm``, auto).

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
"""

from __future__ import annotations

import torch
from torch import nn

from haq.errors import HaqError
from haq.kernels.backends import ActQuant, get_backend, prepared
from haq.kernels.backends.auto import NATIVE_MAX_M, native_available
from haq.kernels.backends.native import decode_linear
from haq.kernels.grid import ActMode, qmax_for, quantize_weight, weight_scales

MatmulImpl = str
"""The name of a registered int8 backend (`haq.kernels.backends.backend_names()`)."""


def int8_matmul(a: torch.Tensor, b: torch.Tensor, impl: MatmulImpl = "auto") -> torch.Tensor:
    """Exact integer product of int8 ``a [M, K]`` and ``b [K, N]``, returned as float32 [M, N], on
    the int8 backend named `impl`. Float32 output is exact up to |value| 2^24, and within 1 ulp beyond.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise HaqError(
            f"int8_matmul needs int8 [M, K] @ [K, N]; got {a.dtype} {tuple(a.shape)} @ {b.dtype} {tuple(b.shape)}"
        )
    backend = get_backend(impl)
    return backend.matmul(a, prepared(backend, b), b)


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
    if (impl in ("auto", "native") and act_mode == "per-token" and static_act_scale is None
            and x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= NATIVE_MAX_M * K
            and w_scale.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and native_available()):  # decode: straight to the fused kernel ("auto" would choose it)
        y = decode_linear(x.reshape(-1, K), qweight_t, w_scale.contiguous(), bias, qmax_for(act_bits))
        return y.reshape(*x.shape[:-1], N)
    backend = get_backend(impl)
    y = backend.linear(x.reshape(-1, K), prepared(backend, qweight_t), qweight_t, w_scale, bias,
                       ActQuant(act_bits, act_mode, static_act_scale))
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


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
        get_backend(impl)  # validates
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
        # (group, index) when this linear shares its input with others (haq.kernels.shared_input)
        self.shared: tuple | None = None

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
        if self.shared is not None:
            group, index = self.shared
            return group.output(x, index)
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
