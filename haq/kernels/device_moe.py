"""A layer's routed experts on an accelerator without a host round trip.

The per-call path (`haq.kernels.moe.dispatch`) reads the routing on the host (`tolist`), a device
sync per MoE layer, and then launches a few kernels per routed expert. Here the routing stays a
device tensor: the layer's T x K slots are sorted by expert on the device, and each projection is
one grouped launch: int8 experts on `triton_int8.w8a8_grouped_blocks`, over a fixed grid of
E x ceil(T / BLOCK_M) row blocks whose blocks of unused experts read nothing; float experts on
PyTorch's `_grouped_mm` with the sorted rows' expert offsets (as transformers' grouped_mm
experts). Every shape and launch follows from T alone, so a decode step through it can be
captured in a CUDA graph (`haq.runtime.graphed_decode`).

A token routes to an expert at most once (top-k picks distinct experts), so an expert has at most
T rows. Each slot's output is weighted, put back in slot order and summed over the K slots of its
token (no atomics: the result does not depend on the schedule).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from haq.kernels import triton_int8
from haq.kernels.grid import quantize_act_per_token


@dataclass(frozen=True)
class SortedSlots:
    """The layer's slots (token t, choice k) -> t * K + k, in ascending expert order."""

    order: torch.Tensor  # [T*K] slot index of each sorted row
    token: torch.Tensor  # [T*K] its token
    ends: torch.Tensor  # [E] one past each expert's last sorted row
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (expert, start, end) int64 [E * blocks per expert]
    block_m: int


def sort_slots(top_k_index: torch.Tensor, num_experts: int) -> SortedSlots:
    """top_k_index [T, K] -> its slots sorted by expert, and the fixed grid of row blocks."""
    T, K = top_k_index.shape
    device = top_k_index.device
    flat = top_k_index.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = (flat[:, None] == torch.arange(num_experts, device=device)).sum(0)  # no bincount: it syncs
    ends = counts.cumsum(0)
    block_m = triton_int8.block_rows(T)  # decode-sized layers: one block per expert
    per_expert = -(-T // block_m)
    starts = (ends - counts)[:, None] + torch.arange(per_expert, device=device) * block_m
    stops = torch.minimum(starts + block_m, ends[:, None])  # <= start: an empty block
    experts = torch.arange(num_experts, device=device).repeat_interleave(per_expert)
    return SortedSlots(order, order // K, ends, (experts, starts.reshape(-1), stops.reshape(-1)), block_m)


@torch.library.custom_op("haq::w8a8_grouped_blocks", mutates_args=())
def _grouped(xq: torch.Tensor, x_scale: torch.Tensor, expert: torch.Tensor, start: torch.Tensor,
             end: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, block_m: int) -> torch.Tensor:
    return triton_int8.w8a8_grouped_blocks(xq, x_scale, [expert, start, end], weights, scales, block_m)


@_grouped.register_fake
def _(xq, x_scale, expert, start, end, weights, scales, block_m):
    """Shapes only (fake tensors, torch.compile): [P, N] float32 whatever the routing."""
    return xq.new_empty(xq.shape[0], weights.shape[1], dtype=torch.float32)


def grouped_projection(xq: torch.Tensor, x_scale: torch.Tensor, slots: SortedSlots, weights: torch.Tensor,
                       scales: torch.Tensor) -> torch.Tensor:
    """Sorted int8 rows xq [P, K] (scales [P]) times each row's expert weights [E, N, K] -> float32 [P, N]."""
    return _grouped(xq, x_scale, *slots.blocks, weights, scales, slots.block_m)


def int8_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 gate_up_q: torch.Tensor, gate_up_scale: torch.Tensor, down_q: torch.Tensor,
                 down_scale: torch.Tensor, act_fn: Callable, act_bits: int = 8,
                 rotate_down: Callable | None = None) -> torch.Tensor:
    """hidden [T, H]; top_k_index, top_k_weights [T, K] -> [T, H] in hidden's dtype. Gated experts
    (gate_up_q [E, 2I, H] gate rows first, down_q [E, H, I]) with dynamic per-token W8A8 activations."""
    slots = sort_slots(top_k_index, gate_up_q.shape[0])
    xq, xs = quantize_act_per_token(hidden, act_bits)  # once per token, shared by its K experts
    gate, up = grouped_projection(xq[slots.token], xs[slots.token, 0], slots, gate_up_q, gate_up_scale).chunk(2, -1)
    h = act_fn(gate) * up
    hq, hs = quantize_act_per_token(h if rotate_down is None else rotate_down(h), act_bits)
    y = grouped_projection(hq, hs[:, 0], slots, down_q, down_scale)
    return _combine(y, slots, top_k_weights).to(hidden.dtype)


def float_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  gate_up: torch.Tensor, down: torch.Tensor, act_fn: Callable) -> torch.Tensor:
    """The same for float experts, gate_up [E, 2I, H] and down [E, H, I] in hidden's dtype."""
    slots = sort_slots(top_k_index, gate_up.shape[0])
    offsets = slots.ends.to(torch.int32)
    gate, up = torch._grouped_mm(hidden[slots.token], gate_up.transpose(1, 2), offs=offsets).chunk(2, -1)
    y = torch._grouped_mm(act_fn(gate) * up, down.transpose(1, 2), offs=offsets)
    return _combine(y.float(), slots, top_k_weights).to(hidden.dtype)


def _combine(y: torch.Tensor, slots: SortedSlots, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Sorted rows' outputs y [T*K, H] -> [T, H]: weighted, back in slot order, summed per token."""
    T, K = top_k_weights.shape
    y = y * top_k_weights.reshape(-1)[slots.order, None].float()
    by_slot = torch.empty_like(y)
    by_slot[slots.order] = y
    return by_slot.view(T, K, -1).sum(1)
