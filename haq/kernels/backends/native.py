"""haq's own C kernel (:mod:`haq.kernels.cpu`): quantize, int8 GEMV and rescale in one pass,
for decode-sized batches on the CPU; exact integers (VNNI ``vpdpbusd`` with the u8 offset
compensated by precomputed row sums, or a plain int32 loop without VNNI)."""
from __future__ import annotations

import torch

from haq.errors import HaqError
from haq.kernels import cpu
from haq.kernels.backends import ActQuant, GemmBackend, get_backend, prepared, register
from haq.kernels.grid import qmax_for

MODES = {"per-token": 0, "per-tensor": 1}
STATIC = 2


class Packed:
    """The weight as the kernel reads it: int8 [N, K] contiguous, its int32 row sums, unit scales."""

    def __init__(self, b: torch.Tensor) -> None:
        self.w = b.t().contiguous()
        self.sums = cpu.row_sums(self.w)
        self.ones = torch.ones(self.w.shape[0], dtype=torch.float32)


_BACKEND: Native | None = None


def _call(x: torch.Tensor, packed: Packed, ws: torch.Tensor, bias: torch.Tensor | None, qmax: int, mode: int,
          static: float) -> torch.Tensor:
    """The kernel on contiguous float32 x [M, K], scales and bias (the caller holds them while it
    reads their memory) -> float32 [M, N]."""
    M, K = x.shape
    y = torch.empty(M, packed.w.shape[0], dtype=torch.float32)
    work = cpu.scratch(M * K + 64 + 4 * M)
    cpu.library().haq_linear(x.data_ptr(), M, K, packed.w.data_ptr(), packed.sums.data_ptr(), ws.data_ptr(),
                             None if bias is None else bias.data_ptr(), y.shape[1], qmax, mode, static,
                             y.data_ptr(), torch.get_num_threads(), work.data_ptr())
    return y


def decode_linear(x: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  qmax: int) -> torch.Tensor:
    """The per-token W8A8 linear of a few float32 CPU rows with the least Python around the kernel
    (`int8_linear`'s path at decode sizes): x [M, K] -> float32 [M, N]."""
    x = x if x.is_contiguous() else x.contiguous()
    return _call(x, prepared(_BACKEND, qweight_t), w_scale, bias, qmax, MODES["per-token"], 0.0)


@register("native")
class Native(GemmBackend):
    packs = True

    def available(self, device: torch.device) -> bool:
        return device.type == "cpu" and cpu.library() is not None

    def prepare(self, b: torch.Tensor) -> Packed:
        self._check(b.device)
        return Packed(b)

    def _check(self, device: torch.device) -> None:
        if not self.available(device):
            why = cpu.unavailable_reason() or f"it runs on the CPU, not {device.type}"
            raise HaqError(f"impl='native' is unavailable: {why}; use 'auto' or 'fbgemm'")

    def matmul(self, a: torch.Tensor, packed: Packed, b: torch.Tensor) -> torch.Tensor:
        # int8 levels with a static scale of 1 are their own quantization: q = a exactly
        return self._run(a.float(), packed, packed.ones, None, 127, STATIC, 1.0)

    def linear(self, x: torch.Tensor, packed: Packed, b: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, act: ActQuant) -> torch.Tensor:
        mode, static = MODES[act.mode], 0.0
        if act.static_scale is not None:
            mode, static = STATIC, float(act.static_scale)
        return self._run(x.float(), packed, w_scale.float(), None if bias is None else bias.float(),
                         qmax_for(act.bits), mode, static)

    def _run(self, x: torch.Tensor, packed: Packed, ws: torch.Tensor, bias: torch.Tensor | None, qmax: int,
             mode: int, static: float) -> torch.Tensor:
        self._check(x.device)
        x, ws = x.contiguous(), ws.contiguous()  # held here: the kernel reads their memory
        return _call(x, packed, ws, None if bias is None else bias.contiguous(), qmax, mode, static)


_BACKEND = get_backend("native")
