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
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from haq.kernels.grid import fake_quant_act, fake_quant_weight
from haq.models.adapters import LayerSpec, SmoothGroup
from haq.models.norms import NormKind, norm_gain, set_norm_gain
from haq.quant.calibration import LayerStats
from haq.quant.fake_quant import ExpertWeights, Probe, attention_replayed, block_error
from haq.quant.recipe import Recipe
from haq.quant.smooth_scales import (alpha_grid, best_alpha, coarse_to_fine_alpha, divide_producer, proxy_pruned_alpha,
                                     scale_weight_columns, smooth_scales)

Scales = torch.Tensor | dict[int, torch.Tensor]  # one s per group, or one per expert (experts-up)


@dataclass
class GroupPlan:
    """A group ready to smooth: the scales for any alpha, and how to fold them in."""

    scales: Callable[[float], Scales]
    apply: Callable[..., None]  # (s, update the recorded statistics too, fold_experts=True: the fused experts too)
    proxy: Callable[[float | None, Recipe], float] | None = None  # the consumers' own error at alpha
    experts: Callable[[Scales], ExpertWeights] | None = None  # the fused experts smoothed by s, made per expert
    # (None: the group has no fused experts); the search scores through it and never folds into them


def _column_max(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([w.abs().amax(0).float() for w in weights]).amax(0)


def _divide_prev(prev: nn.Module, s: torch.Tensor, group: SmoothGroup, norm_kind: NormKind) -> None:
    """prev's outputs / s: a norm's gain (w, or 1 + w for offset norms) and bias, or a linear's rows."""
    bias = getattr(prev, "bias", None)
    weight = norm_gain(prev, norm_kind) if group.kind == "norm" else prev.weight.data
    new_w, new_b = divide_producer(weight, s, None if bias is None else bias.data)
    if group.kind == "norm":
        set_norm_gain(prev, norm_kind, new_w)
    else:
        prev.weight.data = new_w
    if bias is not None:
        prev.bias.data = new_b


def plan_group(layer: nn.Module, group: SmoothGroup, stats: LayerStats, norm_kind: NormKind) -> GroupPlan | None:
    """None when the group saw no activations (e.g. experts that were never routed), or when its
    consumers' inputs are rotated online (the rotation already spreads their outliers)."""
    if any(getattr(layer.get_submodule(name), "online_rotation", None) is not None for name in group.consumers):
        return None
    if group.kind == "experts-up":
        if getattr(layer.get_submodule(group.prev), "down_rotation", None) is not None:
            return None  # the experts' down inputs are rotated online
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

    def apply(s: torch.Tensor, update_stats: bool, fold_experts: bool = True) -> None:
        _divide_prev(layer.get_submodule(group.prev), s, group, norm_kind)
        cols = expand(s)
        for name in group.consumers:
            module = layer.get_submodule(name)
            if name in stats.linears:
                module.weight.data = scale_weight_columns(module.weight.data, cols)
            elif fold_experts:  # in place, as for experts-up: only the final fold gets here
                module.gate_up_proj.data.mul_(cols)
        if update_stats:  # each distinct statistic once (q/k/v share one)
            for st in {id(stats.linears[n]): stats.linears[n] for n in group.consumers if n in stats.linears}.values():
                st.smoothed(cols)
            if any(n not in stats.linears for n in group.consumers):
                stats.experts.smoothed_input(cols)
        for name in group.rescale:
            module = layer.get_submodule(name)
            module.weight.data = scale_weight_columns(module.weight.data, cols)

    scales = lambda alpha: smooth_scales(act_max, w_max, alpha)  # noqa: E731
    # a layer has one fused experts module: the group's consumer that is not a dense linear
    fused = next((layer.get_submodule(n) for n in group.consumers if n not in stats.linears), None)
    view = None
    if fused is not None:
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data

        def view(s: torch.Tensor) -> ExpertWeights:
            cols = expand(s)
            return lambda e: (gate_up[e] * cols, down[e])

    sample = (stats.linears[group.consumers[0]].sample if group.consumers[0] in stats.linears
              else stats.experts.moe_input.sample)
    if sample is None:
        return GroupPlan(scales, apply, experts=view)
    x = sample[:proxy_tokens(weights, sample.shape[0])]
    references: list[torch.Tensor] = []  # the float outputs, computed on the first proxy call

    def proxy(alpha: float | None, recipe: Recipe) -> float:
        if not references:
            references.extend(x @ w.t().float() for w in weights)
        cols = torch.ones(x.shape[1], device=x.device) if alpha is None else expand(scales(alpha))
        return consumer_error(x, weights, references, cols, recipe)

    return GroupPlan(scales, apply, proxy, view)


PROXY_MACS = 2**27
"""Multiply-adds one proxy evaluation may spend: fewer tokens for wide groups (all experts' gate_up)."""


def proxy_tokens(weights: list[torch.Tensor], available: int) -> int:
    return min(available, max(64, PROXY_MACS // sum(w.numel() for w in weights)))


def consumer_error(x: torch.Tensor, weights: list[torch.Tensor], references: list[torch.Tensor],
                   cols: torch.Tensor, recipe: Recipe) -> float:
    """The proxy: squared output error of the group's consumers alone, smoothed by `cols` (consumer
    columns x s, inputs / s), W and X fake-quantized, on the recorded input tokens `x` [T, C]."""
    xs = x / cols
    xq = fake_quant_act(xs, recipe.abits, recipe.act) if recipe.quant_acts else xs
    error = 0.0
    for w, reference in zip(weights, references):
        error += float(((xq @ fake_quant_weight(w.float() * cols, recipe.wbits).t() - reference) ** 2).sum())
    return error


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

    def view(s: dict[int, torch.Tensor]) -> ExpertWeights:
        gate_up, down = experts.gate_up_proj.data, experts.down_proj.data

        def weights(e: int) -> tuple[torch.Tensor, torch.Tensor]:
            if e not in s:
                return gate_up[e], down[e]
            return torch.cat([gate_up[e, :inter], gate_up[e, inter:] / s[e][:, None]]), down[e] * s[e]

        return weights

    def apply(s: dict[int, torch.Tensor], update_stats: bool, fold_experts: bool = True) -> None:
        if not fold_experts:
            return
        gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
        for e, s_e in s.items():  # in place: the search never folds experts (see `view`), only the final fold
            gate_up[e, inter:] /= s_e[:, None]
            down[e] *= s_e
            if update_stats:
                ex.down[e].smoothed(s_e)

    downs = {e: experts.down_proj.data[e] for e in live if ex.down[e].sample is not None}
    if not downs:
        return GroupPlan(scales, apply, experts=view)
    samples = {e: ex.down[e].sample[:proxy_tokens([w], ex.down[e].sample.shape[0])] for e, w in downs.items()}
    references: dict[int, torch.Tensor] = {}

    def proxy(alpha: float | None, recipe: Recipe) -> float:
        """The experts' down projections alone, each on its own recorded inputs."""
        if not references:
            references.update({e: x @ downs[e].t().float() for e, x in samples.items()})
        s = None if alpha is None else scales(alpha)
        return sum(consumer_error(x, [downs[e]], [references[e]],
                                  torch.ones(x.shape[1], device=x.device) if s is None else s[e], recipe)
                   for e, x in samples.items())

    return GroupPlan(scales, apply, proxy, view)


def smooth_layer(layer: nn.Module, spec: LayerSpec, stats: LayerStats, recipe: Recipe,
                 probe: Probe | None) -> dict[str, float | None]:
    """Smooth every group of the layer in place; returns the alpha of each (None = unsmoothed)."""
    alphas: dict[str, float | None] = {}
    for group in spec.groups:
        plan = plan_group(layer, group, stats, spec.norm_kind)
        if plan is None:
            alphas[group.name] = None
            continue
        alpha = recipe.alpha if recipe.method == "smoothquant" else _search(layer, spec, group, plan, recipe, probe)
        if alpha is not None:
            plan.apply(plan.scales(alpha), True)
        alphas[group.name] = alpha
    return alphas


def _search(layer: nn.Module, spec: LayerSpec, group: SmoothGroup, plan: GroupPlan, recipe: Recipe,
            probe: Probe) -> float | None:
    """haq's alpha for one group, each candidate scored by the quantized block's output error."""
    # every apply is out of place (new tensors), so the originals come back by reference:
    # no copy of the layer (a Mixtral layer is 5.6 GB in float32)
    originals = [(p, p.data) for p in layer.parameters()]
    # a group after the attention leaves its output as it is: computed once, replayed for the others
    reuse = not spec.touches_attention(group)
    with attention_replayed(layer, spec) if reuse else nullcontext() as replay:

        def score(candidate: float | None) -> float:
            if replay is not None:
                replay.rewind()
            view = None
            if candidate is not None:  # the fused experts' candidate is made expert by expert, never whole
                s = plan.scales(candidate)
                plan.apply(s, False, fold_experts=False)
                view = plan.experts(s) if plan.experts is not None else None
            error = block_error(layer, spec, recipe, probe, expert_weights=view)
            for param, data in originals:
                param.data = data
            return error

        if recipe.alpha_search == "proxy" and plan.proxy is not None:
            return proxy_pruned_alpha(score, lambda a: plan.proxy(a, recipe), recipe.alpha_step, recipe.proxy_keep)[0]
        if recipe.alpha_search == "grid":
            return best_alpha(score, alpha_grid(recipe.alpha_step))[0]
        return coarse_to_fine_alpha(score, recipe.alpha_step)[0]
