"""Smoothing one decoder layer: fold per-channel scales s into each smoothing group (1/s into the
producer, s into every consumer; routers and shared-expert gates rescaled, not quantized).

smoothquant uses one fixed alpha. haq chooses alpha per group by a grid search whose score is the
*quantized block's* output error: the whole decoder layer, every linear and expert fake-quantized
(W and A as the recipe says), against the float layer's outputs on probe calibration windows.
Groups are searched in order, each with the earlier groups' choices already folded in, so the
score sees the interactions the block really has (attention softmax, gating, routing).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from haq.models.adapters import ArchAdapter, SmoothGroup
from haq.quant.calibration import LayerStats, forward_windows
from haq.quant.recipe import Recipe
from haq.quant.rtn import fake_quant_act, fake_quant_weight
from haq.quant.smooth import (alpha_grid, best_alpha, coarse_to_fine_alpha, divide_producer, scale_weight_columns,
                              smooth_scales)

Scales = torch.Tensor | dict[int, torch.Tensor]  # one s per group, or one per expert (experts-up)


@dataclass
class GroupPlan:
    """A group ready to smooth: the scales for any alpha, and how to fold them in."""

    scales: Callable[[float], Scales]
    apply: Callable[[Scales, bool], None]  # (s, update the recorded statistics too)


def _column_max(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([w.abs().amax(0).float() for w in weights]).amax(0)


def _divide_prev(prev: nn.Module, s: torch.Tensor) -> None:
    bias = getattr(prev, "bias", None)
    new_w, new_b = divide_producer(prev.weight.data, s, None if bias is None else bias.data)
    prev.weight.data = new_w
    if bias is not None:
        prev.bias.data = new_b


def plan_group(layer: nn.Module, group: SmoothGroup, stats: LayerStats) -> GroupPlan | None:
    """None when the group saw no activations (e.g. experts that were never routed), or when its
    consumers' inputs are rotated online (the rotation already spreads their outliers)."""
    if any(getattr(layer.get_submodule(name), "online_rotation", None) is not None for name in group.consumers):
        return None
    if group.kind == "experts-up":
        return _plan_experts_up(layer, group, stats)
    weights, act_maxes = [], []
    for name in group.consumers:
        module = layer.get_submodule(name)
        if name in stats.linears:
            weights.append(module.weight.data)
            act_maxes.append(stats.linears[name].act_max)
        else:  # fused experts: every expert's gate_up reads the group input
            weights += list(module.gate_up_proj.data)
            act_maxes.append(stats.experts.moe_input.act_max)
    if any(a is None for a in act_maxes):
        return None
    act_max, w_max = torch.stack(act_maxes).amax(0), _column_max(weights)
    expand = lambda s: s  # noqa: E731  producer channel -> consumer column
    if group.repeat_attr:  # grouped-query v -> o: one s per v channel, shared by its query heads
        owner, attr = group.repeat_attr.rsplit(".", 1)
        repeat = int(getattr(layer.get_submodule(owner), attr))
        head_dim = layer.get_submodule(owner).head_dim
        kv_heads = layer.get_submodule(group.prev).weight.shape[0] // head_dim

        def fold(cols: torch.Tensor) -> torch.Tensor:  # [kv * repeat * D] -> [kv * D]
            return cols.view(kv_heads, repeat, head_dim).amax(1).reshape(-1)

        def expand(s: torch.Tensor) -> torch.Tensor:  # [kv * D] -> [kv * repeat * D]
            return s.view(kv_heads, 1, head_dim).expand(kv_heads, repeat, head_dim).reshape(-1)

        act_max, w_max = fold(act_max), fold(w_max)

    def apply(s: torch.Tensor, update_stats: bool) -> None:
        _divide_prev(layer.get_submodule(group.prev), s)
        cols = expand(s)
        for name in group.consumers:
            module = layer.get_submodule(name)
            if name in stats.linears:
                module.weight.data = scale_weight_columns(module.weight.data, cols)
                if update_stats:
                    stats.linears[name].smoothed(cols)
            else:
                module.gate_up_proj.data = module.gate_up_proj.data * cols
                if update_stats:
                    stats.experts.smoothed_input(cols)
        for name in group.rescale:
            module = layer.get_submodule(name)
            module.weight.data = scale_weight_columns(module.weight.data, cols)

    return GroupPlan(lambda alpha: smooth_scales(act_max, w_max, alpha), apply)


def _plan_experts_up(layer: nn.Module, group: SmoothGroup, stats: LayerStats) -> GroupPlan | None:
    """Inside every expert: up rows of gate_up absorb 1/s_e, down columns s_e; one alpha for the
    layer's experts, s_e from each expert's own routed activations."""
    experts = layer.get_submodule(group.prev)
    ex = stats.experts
    inter = experts.gate_up_proj.shape[1] // 2
    live = [e for e in range(experts.gate_up_proj.shape[0]) if ex.down[e].act_max is not None]
    if not live:
        return None
    w_max = {e: experts.down_proj.data[e].abs().amax(0) for e in live}

    def scales(alpha: float) -> dict[int, torch.Tensor]:
        return {e: smooth_scales(ex.down[e].act_max, w_max[e], alpha) for e in live}

    def apply(s: dict[int, torch.Tensor], update_stats: bool) -> None:
        gate_up, down = experts.gate_up_proj.data.clone(), experts.down_proj.data.clone()
        for e, s_e in s.items():
            gate_up[e, inter:] = gate_up[e, inter:] / s_e[:, None]
            down[e] = down[e] * s_e
            if update_stats:
                ex.down[e].smoothed(s_e)
        experts.gate_up_proj.data, experts.down_proj.data = gate_up, down

    return GroupPlan(scales, apply)


class FakeQuantExperts(nn.Module):
    """Fused experts computed with fake-quant weights and activations (same forward signature)."""

    def __init__(self, experts: nn.Module, recipe: Recipe, quantize_weights: bool = True):
        super().__init__()
        self.recipe = recipe
        self.act_fn = experts.act_fn
        wq = (lambda w: fake_quant_weight(w, recipe.wbits)) if quantize_weights else (lambda w: w)
        self.gate_up = [wq(w) for w in experts.gate_up_proj.data]
        self.down = [wq(w) for w in experts.down_proj.data]

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        r = self.recipe
        return fake_quant_act(x, r.abits, r.act) if r.quant_acts else x

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            token_idx, k_pos = torch.where(top_k_index == e)
            gate, up = F.linear(self._act(hidden_states[token_idx]), self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(self._act(self.act_fn(gate) * up), self.down[e])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        return out


@contextmanager
def fake_quantized(layer: nn.Module, adapter: ArchAdapter, recipe: Recipe, quantize_weights: bool = True):
    """The layer with every quantized linear and expert fake-quantized, restored on exit
    (`quantize_weights=False`: the weights already hold quantized values; activations only)."""
    saved, handles = {}, []
    for name in adapter.linears:
        linear = layer.get_submodule(name)
        saved[name] = linear.weight.data
        if quantize_weights:
            linear.weight.data = fake_quant_weight(linear.weight.data, recipe.wbits)
        if recipe.quant_acts:
            handles.append(linear.register_forward_pre_hook(
                lambda _m, args: (fake_quant_act(args[0], recipe.abits, recipe.act),) + tuple(args[1:])))
    experts = layer.get_submodule(adapter.moe.experts) if adapter.moe is not None else None
    if experts is not None:
        layer.set_submodule(adapter.moe.experts, FakeQuantExperts(experts, recipe, quantize_weights))
    try:
        yield layer
    finally:
        for h in handles:
            h.remove()
        for name, weight in saved.items():
            layer.get_submodule(name).weight.data = weight
        if experts is not None:
            layer.set_submodule(adapter.moe.experts, experts)


@dataclass
class Probe:
    """Calibration windows the block error is measured on, with the float layer's outputs."""

    inputs: list[torch.Tensor]
    kwargs: dict
    reference: list[torch.Tensor]


@torch.no_grad()
def block_error(layer: nn.Module, adapter: ArchAdapter, recipe: Recipe, probe: Probe,
                quantize_weights: bool = True) -> float:
    """Mean squared error of the fake-quantized layer's outputs against the float outputs."""
    total, count = 0.0, 0
    with fake_quantized(layer, adapter, recipe, quantize_weights):
        outputs = forward_windows(layer, probe.inputs, probe.kwargs)
    for out, ref in zip(outputs, probe.reference):
        total += float(((out - ref) ** 2).sum())
        count += ref.numel()
    return total / max(count, 1)


def smooth_layer(layer: nn.Module, adapter: ArchAdapter, stats: LayerStats, recipe: Recipe,
                 probe: Probe | None) -> dict[str, float | None]:
    """Smooth every group of the layer in place; returns the alpha of each (None = unsmoothed)."""
    alphas: dict[str, float | None] = {}
    for group in adapter.groups:
        plan = plan_group(layer, group, stats)
        if plan is None:
            alphas[group.name] = None
            continue
        if recipe.method == "smoothquant":
            alpha = recipe.alpha
        else:
            saved = {k: v.clone() for k, v in layer.state_dict().items()}

            def score(candidate: float | None) -> float:
                if candidate is not None:
                    plan.apply(plan.scales(candidate), False)
                error = block_error(layer, adapter, recipe, probe)
                layer.load_state_dict(saved)
                return error

            if recipe.alpha_search == "grid":
                alpha, _ = best_alpha(score, alpha_grid(recipe.alpha_step))
            else:
                alpha, _ = coarse_to_fine_alpha(score, recipe.alpha_step)
        if alpha is not None:
            plan.apply(plan.scales(alpha), True)
        alphas[group.name] = alpha
    return alphas
