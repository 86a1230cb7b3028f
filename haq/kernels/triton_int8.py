"""Triton int8 kernels for the GPU (and, under ``TRITON_INTERPRET=1``, on the CPU for the tests):

  w8a8_linear        per-token activation quantization, int8 x int8 -> int32 GEMM and the
                     per-token x per-channel rescale (+ bias) in one kernel
  weight_only_linear int8 weights read and dequantized in the kernel, float activations (W8A16):
                     decode-sized M, where the GEMM is a read of the weights
  w8a8_grouped       one launch over every routed expert of a layer: rows sorted by expert, each
                     program multiplies one block of one expert's rows (the MoE grouped GEMM)

Grid (haq.kernels.grid): symmetric levels in [-qmax, qmax], scale = max(amax / qmax, 1e-8),
round half to even. The fused kernel computes each row's amax in a first pass over K (every N-tile
program of those rows does, so there is no second launch), then quantizes tiles as it loads them.
`triton` is optional (`pip install triton`); `available()` says whether these can run here.
"""
from __future__ import annotations

import functools
import os

import torch

from haq.errors import HaqError

SCALE_EPS = 1e-8


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """CUDA with triton installed, or any device's CPU tensors under the interpreter."""
    if _triton() is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreted())


@functools.lru_cache(maxsize=1)
def _kernels():
    from haq.kernels import triton_kernels as k

    return _triton()[0], k.w8a8_kernel, k.weight_only_kernel, k.grouped_kernel


def _check(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if not available(device):
        why = ("triton is not installed (pip install triton)" if _triton() is None else
               f"Triton runs on CUDA (or on the CPU with TRITON_INTERPRET=1), not {device.type}")
        raise HaqError(f"the triton int8 kernels are unavailable: {why}")


def block_rows(M: int) -> int:
    """Rows per tile for M rows: tl.dot needs every dimension >= 16; decode-sized M fit one tile."""
    return 16 if M <= 16 else 64


def _blocks(M: int) -> tuple[int, int, int]:
    """Tile sizes (rows, output columns, reduction) for M rows."""
    return block_rows(M), 64, 64


def _linear_launch(x: torch.Tensor, qweight: torch.Tensor, out_dtype: torch.dtype):
    """What both linear kernels start from: contiguous operands, the output, the grid and tiles."""
    _check(x, qweight)
    x, qweight = x.contiguous(), qweight.contiguous()
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    bm, bn, bk = _blocks(M)
    triton = _kernels()[0]
    return x, qweight, y, (M, N, K), (triton.cdiv(M, bm), triton.cdiv(N, bn)), dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                bits: int = 8) -> torch.Tensor:
    """x [M, K] float, qweight int8 [N, K], w_scale [N] -> float32 [M, N]."""
    x, qweight, y, (M, N, K), grid, tiles = _linear_launch(x, qweight, torch.float32)
    ws = w_scale.float().contiguous()
    b = bias.float().contiguous() if bias is not None else ws
    _kernels()[1][grid](x, qweight, ws, b, y, M, N, K, float(2 ** (bits - 1) - 1), SCALE_EPS, x.stride(0),
                        qweight.stride(0), y.stride(0), HAS_BIAS=bias is not None, **tiles)
    return y


def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ (qweight [N, K] int8 * w_scale[:, None])^T -> x's dtype [M, N]."""
    x, qweight, y, (M, N, K), grid, tiles = _linear_launch(x, qweight, x.dtype)
    _kernels()[2][grid](x, qweight, w_scale.float().contiguous(), y, M, N, K, x.stride(0), qweight.stride(0),
                        y.stride(0), **tiles)
    return y


def device_path_refusal(act_bits: int, act_mode: str, static_scales: bool, device: torch.device) -> str | None:
    """Why int8 experts with these activation settings cannot run as grouped launches on `device`
    (`haq.kernels.device_moe`), or None: that path quantizes per token, dynamically, in Triton."""
    if act_bits > 8 or act_mode != "per-token" or static_scales:
        return "only dynamic per-token W8A8 int8 experts have a device path (a weight-only or static-scale checkpoint)"
    if not available(device):
        return "the int8 device path is Triton's: install triton (pip install triton) and run on CUDA"
    return None


def w8a8_grouped(xq: torch.Tensor, x_scale: torch.Tensor, counts: list[int], weights: torch.Tensor,
                 scales: torch.Tensor) -> torch.Tensor:
    """Every expert's rows in one launch. xq int8 [P, K]: the rows sorted by expert, `counts[e]`
    rows for expert e; x_scale [P]; weights int8 [E, N, K]; scales [E, N] -> float32 [P, N]."""
    bm = block_rows(max(counts) if counts else 1)
    experts, starts, ends, start = [], [], [], 0
    for e, n in enumerate(counts):
        for s in range(start, start + n, bm):
            experts.append(e)
            starts.append(s)
            ends.append(start + n)
        start += n
    if not experts:
        return torch.empty(xq.shape[0], weights.shape[1], dtype=torch.float32, device=xq.device)
    blocks = [torch.tensor(v, dtype=torch.int64, device=xq.device) for v in (experts, starts, ends)]
    return w8a8_grouped_blocks(xq, x_scale, blocks, weights, scales, bm)


def w8a8_grouped_blocks(xq: torch.Tensor, x_scale: torch.Tensor, blocks: list[torch.Tensor],
                        weights: torch.Tensor, scales: torch.Tensor, block_m: int) -> torch.Tensor:
    """The grouped GEMM over block tables already on the device: `blocks` = (expert, start, end)
    int64 [B] each, at most `block_m` rows per block; a block with start >= end does nothing, so
    a fixed grid can cover any routing (`haq.kernels.device_moe`)."""
    _check(xq, weights)
    triton, _, _, kernel = _kernels()
    P, K = xq.shape
    E, N, _ = weights.shape
    _, bn, bk = _blocks(block_m)
    y = torch.empty(P, N, dtype=torch.float32, device=xq.device)
    weights, scales = weights.contiguous(), scales.float().contiguous()
    kernel[(blocks[0].numel(), triton.cdiv(N, bn))](xq.contiguous(), x_scale.float().contiguous(), weights, scales,
                                                    y, *blocks, N, K, weights.stride(0), weights.stride(1),
                                                    scales.stride(0), BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk)
    return y
