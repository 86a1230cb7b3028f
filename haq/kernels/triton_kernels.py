"""The Triton kernels of :mod:`haq.kernels.triton_int8` (imported only where triton is installed)."""
import triton
import triton.language as tl


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5  # exactly halfway: floor(v + .5) went up; keep it only if even
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)

@triton.jit
def w8a8_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, qmax, eps, stride_xm, stride_wn, stride_ym,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: each row's absmax
        mask = (rm[:, None] < M) & ((k0 + rk)[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.maximum(amax / qmax, eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):  # pass 2: quantize as loaded, int8 dot, int32 accumulate
        mask = (rm[:, None] < M) & ((k0 + rk)[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=mask, other=0.0)
        q = _round_half_even(x.to(tl.float32) / scale[:, None])
        q = tl.minimum(tl.maximum(q, -qmax), qmax).to(tl.int8)
        wmask = (rn[None, :] < N) & ((k0 + rk)[:, None] < K)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + rk)[:, None], mask=wmask, other=0)
        acc += tl.dot(q, w, out_dtype=tl.int32)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * scale[:, None] * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))

@triton.jit
def weight_only_kernel(x_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + rk)[:, None],
                    mask=(rn[None, :] < N) & ((k0 + rk)[:, None] < K), other=0)
        acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    y = acc * ws[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))

@triton.jit
def grouped_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
                   N, K, stride_we, stride_wn, stride_se,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows [start, end) of the sorted, already quantized input belong to expert e; a block with
    start >= end (an unused expert in a fixed grid) reads no weights and stores nothing."""
    pid_b, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_b)
    start, end = tl.load(block_start_ptr + pid_b), tl.load(block_end_ptr + pid_b)
    k_stop = tl.where(start < end, K, 0)
    rm = start + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, k_stop, BLOCK_K):
        q = tl.load(xq_ptr + rm[:, None] * K + (k0 + rk)[None, :],
                    mask=(rm[:, None] < end) & ((k0 + rk)[None, :] < K), other=0)
        w = tl.load(w_ptr + e * stride_we + rn[None, :] * stride_wn + (k0 + rk)[:, None],
                    mask=(rn[None, :] < N) & ((k0 + rk)[:, None] < K), other=0)
        acc += tl.dot(q, w, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + rm, mask=rm < end, other=0.0)
    ws = tl.load(ws_ptr + e * stride_se + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y, mask=(rm[:, None] < end) & (rn[None, :] < N))
