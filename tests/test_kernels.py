"""int8 kernels against plain-torch references, over a grid of shapes (CPU; CUDA when present)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from haq.errors import HaqError
from haq.kernels.backends import backend_names, get_backend
from haq.kernels.backends.fbgemm import has_fbgemm
from haq.kernels.backends.int_mm import int_mm_supports
from haq.kernels.int8 import Int8Linear, int8_linear, int8_matmul
from haq.kernels.moe import gated_mlp
from haq.quant.gptq import accumulate_hessian, gptq_quantize
from haq.kernels.grid import fake_quant_act, quantize_weight, weight_scales

torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MS = [1, 3, 16, 17, 128]
KNS = [(8, 8), (64, 48), (13, 7), (96, 200)]  # (13, 7): not a multiple of 8 (CUDA float path)


def random_int8(*shape: int, gen: torch.Generator, device: str) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8).to(device)


def reference_linear(x, qweight, w_scale, bias=None, act_bits=8, mode="per-token", static=None):
    """Dequantize, then a float64 matmul of the quantized values."""
    xq = fake_quant_act(x.double(), act_bits, mode, static)
    W = qweight.double() * w_scale.double().reshape(-1, 1)
    y = xq @ W.T
    return y if bias is None else y + bias.double()


BACKENDS = ["auto", "float", "fbgemm", "int_mm", "native", "triton"]  # a new int8 backend adds its name here


def test_every_registered_backend_is_tested() -> None:
    assert sorted(BACKENDS) == backend_names()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", BACKENDS)
def test_int8_matmul_is_exact(device: str, impl: str) -> None:
    if not get_backend(impl).available(torch.device(device)):
        pytest.skip(f"backend {impl} does not run on {device} here")
    g = torch.Generator().manual_seed(0)
    for M in MS:
        for K, N in KNS:
            if impl == "int_mm" and not int_mm_supports(torch.device(device), K, N):
                continue
            a = random_int8(M, K, gen=g, device=device)
            w = random_int8(N, K, gen=g, device=device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = int8_matmul(a, w.t(), impl)
            assert out.dtype == torch.float32 and out.shape == (M, N)
            assert torch.equal(out.cpu().double(), (a.cpu().long() @ w.cpu().long().t()).double()), (M, K, N)
    # worst case beyond float32's exact range (1 ulp of float32)
    K = 1100
    a = torch.full((2, K), 127, dtype=torch.int8, device=device)
    b = torch.full((K, 8), -127, dtype=torch.int8, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # N=3 is not a CUDA _int_mm shape
        out = int8_matmul(a, b, impl)
    assert out[0, 0].double().item() == pytest.approx(-127 * 127 * K, abs=1)


@pytest.mark.skipif(not has_fbgemm(), reason="this PyTorch has no FBGEMM")
@pytest.mark.parametrize("vnni", [True, False])
def test_fbgemm_matmul_exact_where_a_single_u8_pass_saturates(monkeypatch, vnni: bool) -> None:
    """Extreme int8 values in every pair of K (the int16 pair sums of vpmaddubsw would saturate
    for a zero-point-128 activation pass), and a weight rewritten in place (the packed copy must
    follow it). Both paths: one pass (int8 dot products) and the split one; the one pass only
    where this CPU has VNNI/AMX."""
    from haq.kernels.backends import fbgemm

    if vnni and not fbgemm.cpu_has_int8_dot():
        pytest.skip("this CPU has no int8 dot products")
    monkeypatch.setattr(fbgemm, "cpu_has_int8_dot", lambda: vnni)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (17, 64), generator=g, dtype=torch.int8)
    a[:, ::2] = -128
    a[1] = 127
    w = torch.randint(-128, 128, (24, 64), generator=g, dtype=torch.int8)
    w[:, :32] = -128
    assert torch.equal(int8_matmul(a, w.t(), "fbgemm").double(), (a.long() @ w.long().t()).double())
    w.mul_(-1).clamp_(-127, 127)
    assert torch.equal(int8_matmul(a, w.t(), "fbgemm").double(), (a.long() @ w.long().t()).double())


def test_int8_matmul_rejects_bad_operands() -> None:
    with pytest.raises(HaqError, match="int8"):
        int8_matmul(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.int8))
    with pytest.raises(HaqError, match="int8"):
        int8_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.int8))
    with pytest.raises(HaqError, match="unknown int8 backend 'fast'"):
        int8_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), "fast")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["per-token", "per-tensor-dynamic", "per-tensor-static"])
def test_int8_linear_matches_dequantized_reference(device: str, mode: str) -> None:
    g = torch.Generator().manual_seed(1)
    for M in MS:
        for K, N in KNS:
            x = (torch.randn(M, K, generator=g) * 3).to(device)
            x[0, : K // 2] *= 20  # an outlier token / channels
            W = torch.randn(N, K, generator=g).to(device)
            scale = weight_scales(W)
            qweight = quantize_weight(W, scale)
            bias = torch.randn(N, generator=g).to(device)
            act_mode = "per-token" if mode == "per-token" else "per-tensor"
            static = 0.05 if mode == "per-tensor-static" else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = int8_linear(x, qweight.t(), scale, bias, act_mode=act_mode, static_act_scale=static)
            ref = reference_linear(x, qweight, scale, bias, mode=act_mode, static=static)
            assert y.dtype == x.dtype and y.shape == (M, N)
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_int8_linear_leading_dims_dtype_and_zero_tokens(device: str) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 32, generator=g).to(device)
    x[1, 2] = 0
    W = torch.randn(24, 32, generator=g).to(device)
    scale = weight_scales(W)
    qweight = quantize_weight(W, scale)
    y = int8_linear(x, qweight.t(), scale)
    assert y.shape == (2, 5, 24) and torch.isfinite(y).all() and (y[1, 2] == 0).all()
    torch.testing.assert_close(y.reshape(10, 24), int8_linear(x.reshape(10, 32), qweight.t(), scale))
    yb = int8_linear(x.to(torch.bfloat16), qweight.t(), scale, act_bits=6)
    assert yb.dtype == torch.bfloat16
    ref = reference_linear(x.to(torch.bfloat16).float(), qweight, scale, act_bits=6)
    torch.testing.assert_close(yb.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    empty = int8_linear(x[:0], qweight.t(), scale)
    assert empty.shape == (0, 5, 24)
    with pytest.raises(HaqError, match="features"):
        int8_linear(torch.randn(3, 31), qweight.t(), scale)
    with pytest.raises(HaqError, match="per-tensor"):
        int8_linear(x, qweight.t(), scale, static_act_scale=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_unsupported_shape_warns_once_and_is_exact() -> None:
    a = torch.randint(-127, 128, (20, 12), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (12, 5), dtype=torch.int8, device="cuda")
    with pytest.warns(UserWarning, match="_int_mm"):
        out = int8_matmul(a, b)
    assert torch.equal(out.double(), (a.double() @ b.double()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        int8_matmul(a, b)  # same shape: no second warning
    with pytest.raises(HaqError, match="K=12"):
        int8_matmul(a, b, "int_mm")


@pytest.mark.parametrize("device", DEVICES)
def test_int8linear_from_float_close_to_linear(device: str) -> None:
    torch.manual_seed(3)
    lin = nn.Linear(64, 48).to(device)
    x = torch.randn(4, 7, 64, device=device)
    q = Int8Linear.from_float(lin)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (48, 64) and q.qweight.is_contiguous()
    assert q.w_scale.dtype == torch.float32 and q.input_scale is None
    assert set(q.state_dict()) == {"qweight", "w_scale", "bias"}
    ref = lin(x)
    with torch.no_grad():
        y = q(x)
    rel = (y - ref).norm() / ref.norm()
    assert rel < 0.02, rel
    assert "in_features=64, out_features=48" in repr(q) and "act_mode=per-token" in repr(q)

    # from a GPTQ solve, static per-tensor activation scale, no bias
    lin2 = nn.Linear(64, 48, bias=False).to(device)
    H, _ = accumulate_hessian(None, 0, x)
    res = gptq_quantize(lin2.weight.detach(), H)
    q2 = Int8Linear.from_float(
        lin2, scale=res.scale, qweight=res.qweight, act_mode="per-tensor", input_scale=x.abs().max() / 127
    )
    assert q2.bias is None and "input_scale" in q2.state_dict()
    with torch.no_grad():
        y2 = q2(x)
    ref2 = fake_quant_act(x, 8, "per-tensor", q2.input_scale) @ res.Q.T
    torch.testing.assert_close(y2, ref2, rtol=1e-4, atol=1e-4)
    with pytest.raises(HaqError, match="scale"):
        Int8Linear.from_float(lin2, qweight=res.qweight)

    # round trip through state_dict into a fresh module
    fresh = Int8Linear(64, 48, bias=True).to(device)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh(x), y)


def test_mixtral_expert_layout_matches_transformers() -> None:
    """Our gate/up split agrees with transformers' MixtralExperts (gate_up_proj [E, 2I, H])."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=3, hidden_act="silu")
    experts = MixtralExperts(cfg)
    torch.manual_seed(4)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    assert experts.gate_up_proj.shape == (3, 48, 32) and experts.down_proj.shape == (3, 32, 24)
    T, e = 20, 1
    x = torch.randn(T, 32)
    with torch.no_grad():
        hf = experts(x, torch.full((T, 1), e), torch.ones(T, 1))
    gu, dn = experts.gate_up_proj[e].detach(), experts.down_proj[e].detach()
    gu_s, dn_s = weight_scales(gu), weight_scales(dn)
    y = int8_expert_mlp(x, quantize_weight(gu, gu_s), gu_s, quantize_weight(dn, dn_s), dn_s)
    assert y.shape == (T, 32)
    rel = (y - hf).norm() / hf.norm()
    assert rel < 0.03, rel


def int8_expert_mlp(x, gu_q, gu_s, dn_q, dn_s):
    """One SiLU-gated expert, both GEMMs int8 (the engine's and Int8Experts' expert math)."""
    return gated_mlp(x, lambda v: int8_linear(v, gu_q.t(), gu_s), lambda h: int8_linear(h, dn_q.t(), dn_s), F.silu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 5, 17, 64])
def test_int8_expert_mlp_matches_fake_quant_reference(device: str, T: int) -> None:
    g = torch.Generator().manual_seed(T)
    H, I = 48, 40
    x = torch.randn(T, H, generator=g).to(device)
    gu = (torch.randn(2 * I, H, generator=g) * 0.2).to(device)
    dn = (torch.randn(H, I, generator=g) * 0.2).to(device)
    gu_s, dn_s = weight_scales(gu), weight_scales(dn)
    gu_q, dn_q = quantize_weight(gu, gu_s), quantize_weight(dn, dn_s)
    y = int8_expert_mlp(x, gu_q, gu_s, dn_q, dn_s)
    # reference: the same quantization steps, float64 matmuls of dequantized values
    gate_up = reference_linear(x, gu_q, gu_s).float()
    h = F.silu(gate_up[:, :I]) * gate_up[:, I:]
    ref = reference_linear(h, dn_q, dn_s)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # and close to the unquantized expert
    fp = F.linear(F.silu(x @ gu[:I].T) * (x @ gu[I:].T), dn)
    assert ((y - fp).norm() / fp.norm()).item() < 0.03


def test_dispatch_reproduces_transformers_fused_experts() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from haq.kernels.moe import dispatch, per_expert, route

    experts = MixtralExperts(MixtralConfig(hidden_size=16, intermediate_size=12, num_local_experts=5))
    torch.manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    x = torch.randn(9, 16)
    index = torch.stack([torch.randperm(5)[:2] for _ in range(9)])  # expert 0..4, some unused
    weights = torch.rand(9, 2)

    def expert(e: int, v: torch.Tensor) -> torch.Tensor:
        return gated_mlp(v, lambda a: F.linear(a, experts.gate_up_proj[e]),
                         lambda h: F.linear(h, experts.down_proj[e]), experts.act_fn)

    with torch.no_grad():
        torch.testing.assert_close(dispatch(x, index, weights, per_expert(expert)), experts(x, index, weights),
                                   rtol=0, atol=1e-6)
    calls = route(index, num_experts=6)
    assert [c.expert for c in calls] == list(range(6)) and calls[5].tokens == 0
    assert sum(c.tokens for c in calls) == index.numel()
