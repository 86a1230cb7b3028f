"""haq's C kernels (haq/kernels/cpu): the fused W8A8 linear and the grouped MoE layer give the
exact integers, and the same floats as the PyTorch backends, on the VNNI path and the portable one."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from haq.kernels import cpu
from haq.kernels.backends.auto import cpu_auto_impl
from haq.kernels.experts import Int8Experts
from haq.kernels.grouped_moe import GroupedExperts
from haq.kernels.int8 import int8_linear, int8_matmul
from haq.kernels.moe import combine, route

pytestmark = pytest.mark.skipif(cpu.library() is None, reason=f"no native kernels: {cpu.unavailable_reason()}")
PATHS = [False, True]  # as built for this CPU (VNNI where it has it), and portable C


@pytest.fixture(params=PATHS, ids=["cpu", "portable"])
def kernels(request, monkeypatch):
    lib = cpu.load(request.param)
    assert lib is not None
    if not request.param and not lib.haq_has_vnni():
        pytest.skip("this CPU has no VNNI: the portable path is the only one")
    monkeypatch.setattr(cpu, "library", lambda: lib)
    return lib


def levels(*shape, gen, extreme: bool = False) -> torch.Tensor:
    if extreme:  # the u8 offset's worst case: every product at +-127 * 127
        return (torch.randint(0, 2, shape, generator=gen, dtype=torch.int8) * 254 - 127).to(torch.int8)
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("extreme", [False, True])
def test_matmul_is_exact(kernels, extreme: bool) -> None:
    g = torch.Generator().manual_seed(0)
    # 5 rows and more: one row streams each block of 4 weight rows, tiles of 4 rows follow (dot_tile)
    for M, K, N in [(1, 576, 3072), (2, 1536, 576), (3, 100, 37), (1, 1, 1), (4, 64, 5), (2, 1100, 9),
                    (9, 576, 64), (5, 64, 8), (13, 100, 37), (22, 1100, 11)]:
        a, w = levels(M, K, gen=g, extreme=extreme), levels(N, K, gen=g, extreme=extreme)
        out = int8_matmul(a, w.t(), "native")
        exact = (a.long() @ w.long().t()).double()
        assert torch.equal(out.double(), exact.float().double()), (M, K, N)  # exact, or float32's rounding of it


@pytest.mark.parametrize("mode", ["per-token", "per-tensor", "static"])
def test_linear_equals_the_pytorch_backend_bit_for_bit(kernels, mode: str) -> None:
    """Same grid, same integers, same float operations in the same order (no FMA contraction)."""
    g = torch.Generator().manual_seed(1)
    for M, K, N in [(1, 576, 576), (2, 96, 130), (4, 7, 3)]:
        x = torch.randn(M, K, generator=g) * 3
        x[0, : K // 2] *= 30  # an outlier token
        w = levels(N, K, gen=g)
        scale = torch.rand(N, generator=g) * 0.01 + 1e-3
        bias = torch.randn(N, generator=g)
        act_mode = "per-token" if mode == "per-token" else "per-tensor"
        static = 0.05 if mode == "static" else None
        ref = int8_linear(x, w.t(), scale, bias, act_mode=act_mode, static_act_scale=static, impl="float")
        out = int8_linear(x, w.t(), scale, bias, act_mode=act_mode, static_act_scale=static, impl="native")
        assert torch.equal(out, ref), (M, K, N)
    w = levels(N, 64, gen=g)
    assert torch.equal(int8_linear(torch.zeros(1, 64), w.t(), scale, bias, impl="native"), bias[None])  # levels 0
    ties = torch.cat([torch.tensor([127.0]), torch.arange(-31, 32) + 0.5])[None]  # scale 1: every x / scale a tie
    w = levels(N, ties.shape[1], gen=g)  # 64 columns: four 16-lane blocks; 40 below: two and a scalar tail
    for x in (ties, ties[:, :40]):
        ref = int8_linear(x, w[:, :x.shape[1]].t(), scale, bias, impl="float")
        assert torch.equal(int8_linear(x, w[:, :x.shape[1]].t(), scale, bias, impl="native"), ref)


@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 20), K=st.integers(1, 200), N=st.integers(1, 40), bits=st.sampled_from([4, 6, 8]),
       seed=st.integers(0, 2**16))
def test_linear_property(M: int, K: int, N: int, bits: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = levels(N, K, gen=g)
    scale = torch.rand(N, generator=g) + 0.01
    ref = int8_linear(x, w.t(), scale, act_bits=bits, impl="float")
    assert torch.equal(int8_linear(x, w.t(), scale, act_bits=bits, impl="native"), ref)


def random_experts(E: int, H: int, I: int, gen: torch.Generator) -> Int8Experts:
    m = Int8Experts(E, H, I, nn.SiLU(), impl="float")
    m.gate_up_q.copy_(levels(E, 2 * I, H, gen=gen))
    m.down_q.copy_(levels(E, H, I, gen=gen))
    m.gate_up_scale.copy_(torch.rand(E, 2 * I, generator=gen) * 2e-3 + 1e-4)
    m.down_scale.copy_(torch.rand(E, H, generator=gen) * 2e-3 + 1e-4)
    return m


@pytest.mark.parametrize("T,K", [(1, 2), (2, 1), (4, 3), (3, 8), (16, 2), (96, 2)])
def test_grouped_layer_equals_the_experts_call_by_call(kernels, T: int, K: int) -> None:
    g = torch.Generator().manual_seed(T * 10 + K)
    E, H, I = 8, 96, 72
    experts = random_experts(E, H, I, g)
    grouped = GroupedExperts.of_int8_experts(experts)
    x = torch.randn(T, H, generator=g)
    x[0, :5] *= 40
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    ref = experts(x, index, weights)
    calls = route(index)
    out = grouped.run(x, calls, weights)
    # the integers are the same; SiLU's expf (libm here, vectorised in PyTorch) may differ by an ulp,
    # which the down input's quantization can turn into one level of a channel
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3 * ref.abs().max().item())
    per_call = grouped.run(x, calls, weights, combined=False)
    assert [y.shape[0] for y in per_call] == [c.tokens for c in calls]
    assert torch.equal(combine(x, calls, per_call, weights), out)  # the same sum, in the same order
    assert torch.equal(grouped.run(x, calls[:1], weights), combine(x, calls[:1], per_call[:1], weights))


def test_grouped_layer_is_only_offered_for_the_math_it_computes() -> None:
    cpu_device = torch.device("cpu")
    assert GroupedExperts.supports(nn.SiLU(), 8, "per-token", False, cpu_device)
    assert not GroupedExperts.supports(nn.GELU(), 8, "per-token", False, cpu_device)
    assert not GroupedExperts.supports(nn.SiLU(), 8, "per-tensor", True, cpu_device)
    assert not GroupedExperts.supports(nn.SiLU(), 16, "per-token", False, cpu_device)  # weight-only
    assert not GroupedExperts.supports(nn.SiLU(), 8, "per-token", False, torch.device("meta"))


def test_a_missing_compiler_leaves_the_pytorch_backends(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("HAQ_HOME", str(tmp_path))
    cpu.load.cache_clear()
    try:
        assert cpu.load() is None
        assert "no C compiler" in cpu.unavailable_reason()
        assert cpu_auto_impl(1) != "native" and not GroupedExperts.supports(nn.SiLU(), 8, "per-token", False,
                                                                            torch.device("cpu"))
    finally:
        cpu.load.cache_clear()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 64), cols=st.integers(1, 700), bits=st.sampled_from([2, 4, 8]),
       spread=st.floats(1e-6, 1e4), seed=st.integers(0, 2**16))
def test_native_fake_quant_is_the_torch_fake_quant(rows: int, cols: int, bits: int, spread: float, seed: int) -> None:
    """The C row quantize-dequantize gives torch's values bit for bit (zero rows and outliers too)."""
    from haq.kernels import grid

    if cpu.library() is None:
        pytest.skip(cpu.unavailable_reason())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * spread * torch.rand(cols, generator=gen) ** 4
    x[0] = 0.0
    wide = x.repeat(1, grid.NATIVE_MIN_ELEMENTS // x.numel() + 1)  # large enough for the C path
    native = grid._native_fake_quant(wide, bits)
    assert native is not None
    scale = grid.weight_scales(wide, bits)
    assert torch.equal(native, grid.dequantize_weight(grid.quantize_weight(wide, scale, bits), scale))
    q, s = grid.quantize_act_per_token(wide, bits)
    assert torch.equal(native, q.float() * s)
