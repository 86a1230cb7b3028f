"""Applying smoothing groups to one decoder layer: gather each group's activation and weight
ranges from the calibration statistics, choose s (fixed alpha, or the adaptive grid search that
minimises the group's fake-quant W/A output error), fold 1/s into the producer and s into every
consumer (routers and shared-expert gates rescaled, not quantized)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from haq.models.adapters import SmoothGroup
from haq.quant.calibration import LayerStats
from haq.quant.recipe import Recipe
from haq.quant.rtn import fake_quant_act, fake_quant_weight
from haq.quant.smooth import alpha_grid, best_alpha, divide_producer, scale_weight_columns, smooth_scales

log = logging.getLogger(__name__)


@dataclass
class Consumer:
    """One weight reading the group's input, with the input samples it sees (routed for experts)."""
    weight: torch.Tensor  # [out, C] view into the module's parameter
    samples: torch.Tensor  # [n, C]


def quant_error(X: torch.Tensor, W: torch.Tensor, s: torch.Tensor, recipe: Recipe) -> float:
    """Sum of squared output errors of fake-quant (X / s) @ (W * s)^T against X @ W^T."""
    if X.shape[0] == 0:
        return 0.0
    ref = X @ W.T
    Xs = X / s
    if recipe.quant_acts:
        Xs = fake_quant_act(Xs, recipe.abits, recipe.act)
    out = Xs @ fake_quant_weight(W * s, recipe.wbits).T
    return float(((out - ref) ** 2).sum())


def choose_alpha(act_max: torch.Tensor, w_max: torch.Tensor, consumers: list[Consumer], recipe: Recipe,
                 expand=lambda s: s) -> tuple[float | None, torch.Tensor | None]:
    """(alpha, s): fixed alpha for smoothquant; for haq the grid candidate (None = no smoothing)
    with the lowest fake-quant output MSE. `expand` maps producer-channel scales to consumer
    columns (identity, or the GQA repeat of v -> o)."""
    if recipe.method == "smoothquant":
        return recipe.alpha, smooth_scales(act_max, w_max, recipe.alpha)
    total = sum(c.samples.shape[0] for c in consumers) or 1

    def score(alpha: float | None) -> float:
        s = torch.ones_like(act_max) if alpha is None else smooth_scales(act_max, w_max, alpha)
        return sum(quant_error(c.samples, c.weight.float(), expand(s), recipe) for c in consumers) / total

    alpha, _ = best_alpha(score, alpha_grid(recipe.alpha_step))
    return alpha, None if alpha is None else smooth_scales(act_max, w_max, alpha)


def _column_max(consumers: list[Consumer]) -> torch.Tensor:
    return torch.stack([c.weight.abs().amax(0).float() for c in consumers]).amax(0)


def smooth_group(layer: nn.Module, group: SmoothGroup, stats: LayerStats, recipe: Recipe) -> float | None:
    """Smooth one group in place; returns the chosen alpha (None = left unsmoothed)."""
    if group.kind == "experts-up":
        return _smooth_experts_up(layer, group, stats, recipe)
    consumers: list[Consumer] = []
    act_maxes = []
    for name in group.consumers:
        module = layer.get_submodule(name)
        if name in stats.linears:
            st = stats.linears[name]
            consumers.append(Consumer(module.weight.data, st.samples))
            act_maxes.append(st.act_max)
        else:  # fused experts: every expert's gate_up reads the group input
            ex = stats.experts
            for e in range(module.gate_up_proj.shape[0]):
                consumers.append(Consumer(module.gate_up_proj.data[e], ex.gate_up_samples(e)))
            act_maxes.append(ex.moe_input.act_max)
    act_max = torch.stack(act_maxes).amax(0)
    if group.kind == "linear" and group.repeat_attr:
        return _smooth_repeated(layer, group, stats, recipe, consumers, act_max)
    alpha, s = choose_alpha(act_max, _column_max(consumers), consumers, recipe)
    if alpha is None:
        return None
    _divide_prev(layer.get_submodule(group.prev), s)
    for name in group.consumers:
        module = layer.get_submodule(name)
        if name in stats.linears:
            module.weight.data = scale_weight_columns(module.weight.data, s)
            stats.linears[name].smoothed(s)
        else:
            module.gate_up_proj.data = module.gate_up_proj.data * s
            stats.experts.smoothed_input(s)
    for name in group.rescale:
        module = layer.get_submodule(name)
        module.weight.data = scale_weight_columns(module.weight.data, s)
    return alpha


def _divide_prev(prev: nn.Module, s: torch.Tensor) -> None:
    bias = getattr(prev, "bias", None)
    new_w, new_b = divide_producer(prev.weight.data, s, None if bias is None else bias.data)
    prev.weight.data = new_w
    if bias is not None:
        prev.bias.data = new_b


def _smooth_repeated(layer, group, stats, recipe, consumers, act_max_cols) -> float | None:
    """v -> o under grouped-query attention: each v channel feeds `repeat` o columns (one per
    query head of its group), so one s per v channel is shared by those columns."""
    owner, attr = group.repeat_attr.rsplit(".", 1)
    repeat = int(getattr(layer.get_submodule(owner), attr))
    prev = layer.get_submodule(group.prev)
    kv_channels = prev.weight.shape[0]
    head_dim = layer.get_submodule(group.prev.rsplit(".", 1)[0]).head_dim
    kv_heads = kv_channels // head_dim

    def fold(cols: torch.Tensor) -> torch.Tensor:  # [kv * repeat * D] -> [kv * D]
        return cols.view(kv_heads, repeat, head_dim).amax(1).reshape(-1)

    def expand(s: torch.Tensor) -> torch.Tensor:  # [kv * D] -> [kv * repeat * D]
        return s.view(kv_heads, 1, head_dim).expand(kv_heads, repeat, head_dim).reshape(-1)

    alpha, s = choose_alpha(fold(act_max_cols), fold(_column_max(consumers)), consumers, recipe, expand)
    if alpha is None:
        return None
    _divide_prev(prev, s)
    s_cols = expand(s)
    for name in group.consumers:
        module = layer.get_submodule(name)
        module.weight.data = scale_weight_columns(module.weight.data, s_cols)
        stats.linears[name].smoothed(s_cols)
    return alpha


def _smooth_experts_up(layer, group, stats, recipe) -> float | None:
    """Inside every expert: up rows of gate_up absorb 1/s_e, down columns s_e; one alpha shared
    by the layer's experts, s_e from each expert's own routed activations."""
    experts = layer.get_submodule(group.prev)
    ex = stats.experts
    E, two_i, _ = experts.gate_up_proj.shape
    inter = two_i // 2
    live = [e for e in range(E) if ex.down[e].act_max is not None]
    if not live:
        return None
    w_max = {e: experts.down_proj.data[e].abs().amax(0) for e in live}

    def scales(e: int, alpha: float | None) -> torch.Tensor:
        if alpha is None:
            return torch.ones(inter)
        return smooth_scales(ex.down[e].act_max, w_max[e], alpha)

    if recipe.method == "smoothquant":
        alpha = recipe.alpha
    else:
        total = sum(ex.down[e].samples.shape[0] for e in live) or 1

        def score(a):
            return sum(quant_error(ex.down[e].samples, experts.down_proj.data[e].float(), scales(e, a), recipe)
                       for e in live) / total

        alpha, _ = best_alpha(score, alpha_grid(recipe.alpha_step))
    if alpha is None:
        return None
    gate_up, down = experts.gate_up_proj.data.clone(), experts.down_proj.data.clone()
    for e in live:
        s = scales(e, alpha)
        gate_up[e, inter:] = gate_up[e, inter:] / s[:, None]
        down[e] = down[e] * s
        ex.down[e].smoothed(s)
    experts.gate_up_proj.data, experts.down_proj.data = gate_up, down
    return alpha
