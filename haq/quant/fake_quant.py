"""Fake quantization of one decoder layer, for calibration and error analysis only (the int8 modules
of :mod:`haq.kernels` run real integer GEMMs): every quantized linear and expert computed with
quantize-dequantized weights and activations, and the block error that the alpha search and the
GPTQ check score candidates by."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from haq.kernels.grid import fake_quant_act, fake_quant_weight
from haq.kernels.moe import dispatch, gated_mlp, per_expert
from haq.models.adapters import LayerSpec
from haq.quant.calibration import forward_windows
from haq.quant.recipe import Recipe


ExpertWeights = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # expert -> (gate_up, down) as computed


class FakeQuantExperts(nn.Module):
    """Fused experts computed with fake-quant weights and activations (same forward signature).
    Each expert's weights are made when it runs, so memory holds one expert's copy, not all of them
    (all of a Mixtral layer's experts are 5.6 GB in float32). `weights` overrides where the float
    weights come from (a smoothing candidate, dequantized solutions); they are fake-quantized as usual."""

    def __init__(self, experts: nn.Module, recipe: Recipe, quantize_weights: bool = True,
                 weights: ExpertWeights | None = None):
        super().__init__()
        self.recipe = recipe
        self.act_fn = experts.act_fn
        self.rotate = getattr(experts, "down_rotation", None) or (lambda h: h)  # weights stored as W R
        gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
        source = weights or (lambda e: (gate_up[e], down[e]))
        wq = (lambda w: fake_quant_weight(w, recipe.wbits)) if quantize_weights else (lambda w: w)
        self.weights = lambda e: tuple(wq(w) for w in source(e))

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        r = self.recipe
        return fake_quant_act(x, r.abits, r.act) if r.quant_acts else x

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.weights(e)
        return gated_mlp(self._act(x), lambda v: F.linear(v, gate_up),
                         lambda h: F.linear(self._act(self.rotate(h)), down), self.act_fn)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return dispatch(hidden_states, top_k_index, top_k_weights, per_expert(self.expert_forward))


@contextmanager
def fake_quantized(layer: nn.Module, spec: LayerSpec, recipe: Recipe, quantize_weights: bool = True,
                   expert_weights: ExpertWeights | None = None):
    """The layer with every quantized linear and expert fake-quantized, restored on exit
    (`quantize_weights=False`: the weights already hold quantized values; activations only;
    `expert_weights`: where the experts' float weights come from, e.g. a smoothing candidate)."""
    saved, handles = {}, []
    last: list = [None, -1, None]  # (input, its version, its fake-quant): q/k/v and gate/up read one tensor

    def quantize_input(_module, args):
        x = args[0]
        if last[0] is not x or last[1] != x._version:  # quantized once, unless written in between
            last[:] = [x, x._version, fake_quant_act(x, recipe.abits, recipe.act)]
        return (last[2],) + tuple(args[1:])

    for name in spec.linears:
        linear = layer.get_submodule(name)
        saved[name] = linear.weight.data
        if quantize_weights:
            linear.weight.data = fake_quant_weight(linear.weight.data, recipe.wbits)
        if recipe.quant_acts:
            handles.append(linear.register_forward_pre_hook(quantize_input))
    experts = layer.get_submodule(spec.moe.experts) if spec.moe is not None else None
    if experts is not None:
        layer.set_submodule(spec.moe.experts, FakeQuantExperts(experts, recipe, quantize_weights, expert_weights))
    try:
        yield layer
    finally:
        for h in handles:
            h.remove()
        for name, weight in saved.items():
            layer.get_submodule(name).weight.data = weight
        if experts is not None:
            layer.set_submodule(spec.moe.experts, experts)


@dataclass
class Probe:
    """Calibration windows the block error is measured on, with the float layer's outputs."""

    inputs: list[torch.Tensor]
    kwargs: dict
    reference: list[torch.Tensor]


@torch.no_grad()
def block_error(layer: nn.Module, spec: LayerSpec, recipe: Recipe, probe: Probe,
                quantize_weights: bool = True, expert_weights: ExpertWeights | None = None) -> float:
    """Mean squared error of the fake-quantized layer's outputs against the float outputs."""
    total, count = 0.0, 0
    with fake_quantized(layer, spec, recipe, quantize_weights, expert_weights):
        outputs = forward_windows(layer, probe.inputs, probe.kwargs)
    for out, ref in zip(outputs, probe.reference):
        total += float(((out - ref) ** 2).sum())
        count += ref.numel()
    return total / max(count, 1)


class ReplayedAttention:
    """A layer's attention block while only later parts of the layer change (an MLP group's alpha
    search): the first block error runs it and records its outputs, call by call; the others
    replay them. Same inputs, same weights, so the same outputs, at none of the cost."""

    def __init__(self, forward: Callable):
        self.forward = forward
        self.outputs: list = []
        self.recorded = False
        self.calls = 0

    def rewind(self) -> None:
        """Before each block error: the first records, the next ones replay from the start."""
        self.recorded = self.recorded or bool(self.outputs)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        if not self.recorded:
            self.outputs.append(self.forward(*args, **kwargs))
            return self.outputs[-1]
        self.calls += 1
        return self.outputs[self.calls - 1]


@contextmanager
def attention_replayed(layer: nn.Module, spec: LayerSpec):
    """The layer's attention block answering from a `ReplayedAttention` (its forward is swapped,
    the module tree stays as it is), restored on exit."""
    attention = layer.get_submodule(spec.attention)
    replay = ReplayedAttention(attention.forward)
    attention.forward = replay
    try:
        yield replay
    finally:
        del attention.forward
