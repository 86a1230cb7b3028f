"""The one routed-expert dispatch and the one gated expert MLP.

Every module that computes a layer's routed experts (the int8 experts, the calibration observer,
the fake-quant experts, the offloading engine) goes through `dispatch`: the router's choices are
grouped into one call per expert (`route`), the caller's `run` computes the calls, and the
results are weighted and summed back in ascending expert order, as transformers' fused experts do.
What differs between them is only `run`: the engine decides per call where it runs, the observer
records statistics. A grouped or fused MoE kernel plugs in here, as one `run` over all calls. The
one exception is `haq.kernels.device_moe` (int8 experts on CUDA): it keeps the routing on the
device, so it sums a token's experts in slot order, without `route`'s host lists.

T = tokens, H = hidden, I = expert intermediate size, K = top-k, n = tokens of one call.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertCall:
    """One expert's share of a layer's tokens: which rows of the input, at which top-k slot."""

    expert: int
    token_idx: torch.Tensor  # [n] rows of hidden_states
    k_pos: torch.Tensor  # [n] slot in top_k_index / top_k_weights

    @property
    def tokens(self) -> int:
        return len(self.token_idx)


RunCalls = Callable[[torch.Tensor, Sequence[ExpertCall]], Sequence[torch.Tensor | None]]
"""(hidden_states [T, H], calls) -> one output [n, H] per call (None: the call adds nothing)."""


def route(top_k_index: torch.Tensor, num_experts: int | None = None) -> list[ExpertCall]:
    """The calls of one layer in ascending expert order: the routed experts only, or, with
    `num_experts`, every expert (empty calls included, for observers that see all experts)."""
    experts = torch.unique(top_k_index).tolist() if num_experts is None else range(num_experts)
    calls = []
    for e in experts:
        token_idx, k_pos = torch.where(top_k_index == e)
        calls.append(ExpertCall(int(e), token_idx, k_pos))
    return calls


def combine(hidden_states: torch.Tensor, calls: Sequence[ExpertCall], results: Sequence[torch.Tensor | None],
            top_k_weights: torch.Tensor) -> torch.Tensor:
    """sum over calls of weight[token, slot] * result[token], accumulated in call order."""
    out = torch.zeros_like(hidden_states)
    for call, y in zip(calls, results):
        if y is not None and call.tokens:
            weights = top_k_weights[call.token_idx, call.k_pos, None]
            out.index_add_(0, call.token_idx, (y * weights).to(out.dtype))
    return out


def dispatch(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, run: RunCalls,
             num_experts: int | None = None) -> torch.Tensor:
    """hidden_states [T, H]; top_k_index, top_k_weights [T, K] -> [T, H]."""
    calls = route(top_k_index, num_experts)
    return combine(hidden_states, calls, run(hidden_states, calls), top_k_weights)


def per_expert(expert_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> RunCalls:
    """A `run` that computes each call on its own tokens: expert_fn(e, x [n, H]) -> [n, H]."""
    def run(hidden_states: torch.Tensor, calls: Sequence[ExpertCall]) -> list[torch.Tensor]:
        return [expert_fn(call.expert, hidden_states[call.token_idx]) for call in calls]

    return run


def gated_mlp(x: torch.Tensor, gate_up: Linear, down: Linear, act_fn: Linear) -> torch.Tensor:
    """One gated expert: down(act(gate(x)) * up(x)), with gate and up one GEMM whose first half of
    outputs is gate (transformers 5.x layout: gate_up_proj[e] [2I, H], down_proj[e] [H, I])."""
    gate, up = gate_up(x).chunk(2, dim=-1)  # [n, I] each
    return down(act_fn(gate) * up)  # [n, H]
