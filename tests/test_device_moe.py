"""The device MoE path (haq.kernels.device_moe): the routed experts of a layer as grouped Triton
launches with the routing never leaving the device. Run on the CPU under Triton's interpreter
(conftest sets TRITON_INTERPRET=1 without CUDA), on the GPU where one is."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from haq.kernels import device_moe, triton_int8
from tests.test_native_kernels import random_experts

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_int8.available(DEVICE),
                                reason="triton is not installed, or neither CUDA nor TRITON_INTERPRET=1")


def routing(T: int, K: int, E: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return index, torch.rand(T, K, generator=g)


@pytest.mark.parametrize("T,K", [(1, 2), (3, 2), (5, 4), (16, 2), (20, 2), (130, 2)])
def test_sorted_slots_cover_each_experts_rows_once(T: int, K: int) -> None:
    E = 8
    index, _ = routing(T, K, E, seed=T * 7 + K)
    slots = device_moe.sort_slots(index, E)
    flat = index.reshape(-1)
    assert torch.equal(slots.token, slots.order // K)
    assert torch.equal(flat[slots.order], flat.sort(stable=True).values)
    covered = torch.zeros(T * K, dtype=torch.int64)
    for e, start, end in zip(*(b.tolist() for b in slots.blocks)):
        if start < end:
            assert end - start <= slots.block_m
            assert (flat[slots.order[start:end]] == e).all()
            covered[start:end] += 1
    assert (covered == 1).all()  # every sorted row in exactly one block, unused experts' blocks empty


@pytest.mark.parametrize("T,K", [(1, 2), (4, 3), (16, 2), (20, 2)])
def test_grouped_on_device_equals_the_call_by_call_experts(T: int, K: int) -> None:
    E, H, I = 8, 96, 72
    plain = random_experts(E, H, I, torch.Generator().manual_seed(T + K))
    grouped = copy.deepcopy(plain)
    grouped.impl = "triton"
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    x[0, :5] *= 40  # an outlier token
    index, weights = routing(T, K, E, seed=T * 3 + K)
    assert grouped.grouped_on_device(x.to(DEVICE)) and not plain.grouped_on_device(x)
    ref = plain(x, index, weights)
    out = grouped.to(DEVICE)(x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE)).cpu()
    # the same integers and rescales; only the sum over a token's K experts runs in slot order
    # instead of ascending expert order
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_the_device_path_reads_no_routing_on_the_host() -> None:
    """Under fake tensors any data-dependent step (`tolist`, `nonzero`, a bincount's size) raises:
    the layer's shapes follow from T alone, as a CUDA graph capture needs."""
    E, H, I, T, K = 8, 64, 48, 3, 2
    m = random_experts(E, H, I, torch.Generator().manual_seed(1))
    x = torch.randn(T, H)
    index, weights = routing(T, K, E, seed=2)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = device_moe.int8_experts(mode.from_tensor(x), mode.from_tensor(index), mode.from_tensor(weights),
                                      m.gate_up_q, m.gate_up_scale, m.down_q, m.down_scale, m.act_fn)
        assert out.shape == (T, H)
        with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):  # the per-call path reads it
            m(mode.from_tensor(x), mode.from_tensor(index), mode.from_tensor(weights))


def test_float_experts_on_grouped_mm_equal_the_call_by_call_experts() -> None:
    from torch.nn import functional as F

    from haq.kernels.moe import dispatch, gated_mlp, per_expert

    g = torch.Generator().manual_seed(9)
    E, H, I, T, K = 6, 40, 24, 5, 2
    gate_up, down = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    x = torch.randn(T, H, generator=g)
    index, weights = routing(T, K, E, seed=4)
    act = nn.SiLU()
    ref = dispatch(x, index, weights, per_expert(lambda e, v: gated_mlp(
        v, lambda a: F.linear(a, gate_up[e]), lambda h: F.linear(h, down[e]), act)))
    out = device_moe.float_experts(x, index, weights, gate_up, down, act)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
