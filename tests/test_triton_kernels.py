"""The Triton kernels (haq.kernels.triton_int8) against the exact integer references: run on the
CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA), on the GPU where one is."""
from __future__ import annotations

import pytest
import torch

from haq.kernels import triton_int8
from haq.kernels.grid import quantize_act_per_token
from haq.kernels.int8 import Int8Linear, int8_linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_int8.available(DEVICE),
                                reason="triton is not installed, or neither CUDA nor TRITON_INTERPRET=1")


def levels(*shape, gen) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("M,K,N", [(1, 64, 48), (5, 100, 70), (17, 40, 16), (3, 130, 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_w8a8_equals_the_float_backend_bit_for_bit(M: int, K: int, N: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g) * 3
    x[0, :3] *= 50  # an outlier
    if M > 1:  # a row of scale 1 with values halfway between levels: rounded half to even, as torch.round
        x[-1] = torch.linspace(-3.5, 3.5, K)
        x[-1, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])
    w = levels(N, K, gen=g)
    scale = torch.rand(N, generator=g) * 1e-2 + 1e-4
    b = torch.randn(N, generator=g) if bias else None
    for bits in (8, 6):
        ref = int8_linear(x, w.t(), scale, b, act_bits=bits, impl="float")
        out = triton_int8.w8a8_linear(x.to(DEVICE), w.to(DEVICE), scale.to(DEVICE),
                                      None if b is None else b.to(DEVICE), bits).cpu()
        assert torch.equal(out, ref), bits


def test_weight_only_matches_the_dequantized_product() -> None:
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 96, generator=g), levels(40, 96, gen=g)
    scale = torch.rand(40, generator=g) * 1e-2
    out = triton_int8.weight_only_linear(x.to(DEVICE), w.to(DEVICE), scale.to(DEVICE)).cpu()
    ref = (x.double() @ (w.double() * scale.double()[:, None]).t()).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_grouped_gemm_runs_every_expert_in_one_launch() -> None:
    g = torch.Generator().manual_seed(4)
    E, K, N = 4, 72, 40
    counts = [3, 0, 20, 1]  # an unused expert, one of more than a block of rows
    xq, xs = quantize_act_per_token(torch.randn(sum(counts), K, generator=g))
    weights, scales = levels(E, N, K, gen=g), torch.rand(E, N, generator=g) * 1e-2
    out = triton_int8.w8a8_grouped(xq.to(DEVICE), xs.reshape(-1).to(DEVICE), counts, weights.to(DEVICE),
                                   scales.to(DEVICE)).cpu()
    start, parts = 0, []
    for e, n in enumerate(counts):
        rows = slice(start, start + n)
        parts.append((xq[rows].long() @ weights[e].long().t()).float() * xs[rows] * scales[e][None])
        start += n
    assert torch.equal(out, torch.cat(parts))


def test_an_int8_linear_on_the_triton_backend() -> None:
    torch.manual_seed(5)
    linear = torch.nn.Linear(64, 24)
    x = torch.randn(2, 7, 64)
    plain = Int8Linear.from_float(linear, impl="float")
    fused = Int8Linear.from_float(linear, impl="triton").to(DEVICE)
    assert torch.equal(fused(x.to(DEVICE)).cpu(), plain(x))


HOPPER_COMPILE = """
import sys
from triton import compiler
from triton.backends.compiler import GPUTarget
from haq.kernels import triton_kernels as k

ints = dict.fromkeys(("M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "stride_we", "stride_se"), "i32")
kernels = [
    (k.w8a8_kernel, {"x_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32",
                     "qmax": "fp32", "eps": "fp32"}, {"HAS_BIAS": True}),
    (k.weight_only_kernel, {"x_ptr": "*bf16", "w_ptr": "*i8", "ws_ptr": "*fp32", "y_ptr": "*bf16"}, {}),
    (k.grouped_kernel, {"xq_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "y_ptr": "*fp32",
                        "block_expert_ptr": "*i64", "block_start_ptr": "*i64", "block_end_ptr": "*i64"}, {}),
]
for block_m in (16, 64):
    for kernel, types, constants in kernels:
        signature = {n: types.get(n) or ints.get(n) or "constexpr" for n in kernel.arg_names}
        source = compiler.ASTSource(fn=kernel, signature=signature,
                                    constexprs={"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, **constants})
        try:
            compiled = compiler.compile(source, target=GPUTarget("cuda", 90, 32))
        except FileNotFoundError as error:  # no ptxas bundled: nothing to compile with (an error in it fails)
            sys.exit(f"SKIP no ptxas: {error}")
        assert compiled.asm["cubin"], kernel.fn.__name__
print("compiled")
"""


def test_the_kernels_compile_for_a_hopper_gpu() -> None:
    """Ahead of time for sm90, without a GPU (Triton's bundled ptxas), outside the interpreter:
    what the interpreter cannot check (types, tl.dot shapes, a loop bound known only at run time)
    fails here, not on a lent GPU."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "SKIP" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]
