"""Observing one decoder layer on calibration inputs: hooks on its dense linears and a calibration
stand-in for fused experts that records per-expert inputs (routed tokens, or all tokens with
`all_experts`) while computing exactly what the original experts compute."""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from haq.kernels.moe import ExpertCall, dispatch, gated_mlp
from haq.models.adapters import LayerSpec
from haq.quant.observers import InputStats


class ObservedExperts(nn.Module):
    """Same forward as transformers' fused experts (E = experts, T = tokens, K = top-k);
    statistics per expert: gate_up input (hidden states) and down input (act(gate) * up)."""

    def __init__(self, experts: nn.Module, all_experts: bool, hessian: bool = True):
        super().__init__()
        self.inner = experts
        self.all_experts = all_experts
        E = experts.gate_up_proj.shape[0]
        self.moe_input = InputStats("experts input", hessian=hessian and all_experts, sample_tokens=PROXY_TOKENS)
        self.gate_up = [InputStats(f"expert {e} gate_up", hessian=hessian and not all_experts) for e in range(E)]
        self.down = [InputStats(f"expert {e} down", hessian=hessian, sample_tokens=PROXY_TOKENS) for e in range(E)]
        self.routed_tokens = [0] * E

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        self.moe_input.update(hidden_states)
        return dispatch(hidden_states, top_k_index, top_k_weights, self._run, num_experts=len(self.down))

    def _run(self, hidden_states: torch.Tensor, calls: Sequence[ExpertCall]) -> list[torch.Tensor | None]:
        experts, results = self.inner, []
        rotate = getattr(experts, "down_rotation", None) or (lambda h: h)  # --rotate: stats of x R
        for call in calls:
            e = call.expert
            self.routed_tokens[e] += call.tokens
            x = hidden_states if self.all_experts else hidden_states[call.token_idx]
            if x.shape[0] == 0:
                results.append(None)
                continue
            if not self.all_experts:
                self.gate_up[e].update(x)

            def down(h: torch.Tensor, e: int = e, call: ExpertCall = call) -> torch.Tensor:
                h = rotate(h)
                self.down[e].update(h)
                return F.linear(h[call.token_idx] if self.all_experts else h, experts.down_proj[e])

            results.append(gated_mlp(x, lambda v, e=e: F.linear(v, experts.gate_up_proj[e]), down, experts.act_fn))
        return results

    def gate_up_hessian(self, e: int) -> tuple[torch.Tensor | None, int]:
        if self.all_experts:
            return self.moe_input.H, self.moe_input.tokens
        return self.gate_up[e].H, self.gate_up[e].tokens

    def smoothed_input(self, s: torch.Tensor) -> None:
        self.moe_input.smoothed(s)
        for stats in self.gate_up:
            stats.smoothed(s)


BATCH_TOKENS = 8192
"""Calibration windows are run through a layer in batches of up to this many tokens: one GEMM per
linear instead of one per window (on CPUs without int8 dot products every int8 call converts its
weights, so per-window calls cost many times the arithmetic)."""


@torch.no_grad()
def forward_windows(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict,
                    batch_tokens: int = BATCH_TOKENS) -> list[torch.Tensor]:
    """The layer's outputs for each window [1, S, H] of `inputs`, computed in batches of equal-length
    windows (the shared kwargs, e.g. rotary embeddings, broadcast over the batch)."""
    outputs: list[torch.Tensor] = []
    start = 0
    while start < len(inputs):
        seq = inputs[start].shape[1]
        stop = start + 1
        while (stop < len(inputs) and inputs[stop].shape[1] == seq
               and (stop - start + 1) * seq <= batch_tokens):
            stop += 1
        out = layer(torch.cat(inputs[start:stop]), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        outputs += list(out.split(1))
        start = stop
    return outputs


@dataclass
class LayerStats:
    linears: dict[str, InputStats] = field(default_factory=dict)
    experts: ObservedExperts | None = None


PROXY_TOKENS = 512
"""Input tokens kept per distinct linear input for haq's alpha proxy (the consumers' own error)."""


def shared_input_leader(spec: LayerSpec, name: str) -> str:
    """The first linear of `name`'s norm smoothing group (all its consumers read the norm's output),
    or `name` itself when no other linear reads its input."""
    for group in spec.norm_groups:
        readers = [c for c in group.consumers if c in spec.linears]
        if name in readers:
            return readers[0]
    return name


@contextmanager
def observe_layer(layer: nn.Module, spec: LayerSpec, all_experts: bool, hessian: bool = True):
    """Hooks on the layer's linears and, for MoE, experts swapped for `ObservedExperts`;
    `hessian=False` (RTN recipes) records activation ranges only."""
    stats = LayerStats()
    handles = []
    for name in spec.linears:
        leader = shared_input_leader(spec, name)
        if leader != name:  # q/k/v, gate/up: one statistic (one Hessian) for the one input they read
            stats.linears[name] = stats.linears[leader]
            continue
        stats.linears[name] = InputStats(name, hessian=hessian, sample_tokens=PROXY_TOKENS)
        handles.append(layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, st=stats.linears[name]: st.update(args[0])))
    original = None
    if spec.moe is not None:
        original = layer.get_submodule(spec.moe.experts)
        stats.experts = ObservedExperts(original, all_experts, hessian)
        layer.set_submodule(spec.moe.experts, stats.experts)
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        if original is not None:
            layer.set_submodule(spec.moe.experts, original)
