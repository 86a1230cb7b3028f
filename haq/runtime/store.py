"""Expert store: every expert's weights in host memory (pinned when CUDA exists), one entry per
(layer, expert), and the one function that runs an expert on whichever device its weights are.

Int8 experts (haq checkpoints) keep int8 weights and per-channel scales; float experts (plain HF
models) keep their float weights. The math is the same as the model's own experts module, so an
offloaded model computes exactly what the plain model computes on the same device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from haq.errors import HaqError
from haq.kernels.experts import Int8Experts
from haq.kernels.grouped_moe import GroupedExperts
from haq.kernels.int8 import int8_linear
from haq.kernels.moe import gated_mlp

Key = tuple[int, int]  # (layer, expert)


@dataclass
class ExpertWeights:
    """One expert: gate_up [2I, H] (gate rows first), down [H, I]; scales when int8.
    T = tokens, H = hidden, I = intermediate."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None
    gate_up_in_scale: torch.Tensor | None = None  # static per-tensor activation scales
    down_in_scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.gate_up, self.down, self.gate_up_scale, self.down_scale, self.gate_up_in_scale,
                            self.down_in_scale) if t is not None]

    def to(self, device: torch.device, non_blocking: bool = False) -> ExpertWeights:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return ExpertWeights(move(self.gate_up), move(self.down), move(self.gate_up_scale), move(self.down_scale),
                             move(self.gate_up_in_scale), move(self.down_in_scale))

    def copy(self) -> ExpertWeights:
        """A separate copy (the 'device' copy when the device is the CPU itself)."""
        def clone(t):
            return None if t is None else t.clone()

        return ExpertWeights(clone(self.gate_up), clone(self.down), clone(self.gate_up_scale),
                             clone(self.down_scale), clone(self.gate_up_in_scale), clone(self.down_in_scale))

    def pin(self) -> ExpertWeights:
        def pin(t):
            return None if t is None else t.pin_memory()

        return ExpertWeights(pin(self.gate_up), pin(self.down), pin(self.gate_up_scale), pin(self.down_scale),
                             pin(self.gate_up_in_scale), pin(self.down_in_scale))


@dataclass(frozen=True)
class ExpertMath:
    """How the model's experts compute: activation function and int8 activation settings."""

    act_fn: nn.Module
    act_bits: int = 16  # > 8: float experts, or weight-only int8
    act_mode: str = "per-token"
    impl: str = "auto"  # the int8 backend (haq.kernels.backends)
    down_rotation: nn.Module | None = None  # --rotate: x -> x R of every down input (one per model)

    def forward(self, w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] on w's device (as `Int8Experts.expert_forward` / HF experts)."""
        rotate = self.down_rotation or (lambda h: h)
        return gated_mlp(x, lambda v: self._linear(v, w.gate_up, w.gate_up_scale, w.gate_up_in_scale),
                         lambda h: self._linear(rotate(h), w.down, w.down_scale, w.down_in_scale), self.act_fn)

    def _linear(self, x, weight, scale, in_scale):
        if scale is None:
            return F.linear(x, weight)
        if self.act_bits > 8:
            return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None])
        return int8_linear(x, weight.t(), scale, act_bits=self.act_bits, act_mode=self.act_mode,
                           static_act_scale=in_scale, impl=self.impl)


def common_math(maths: list[ExpertMath]) -> ExpertMath:
    """The one math of every MoE layer's experts (the store runs one): their down rotations must agree."""
    def same(a: nn.Module | None, b: nn.Module | None) -> bool:
        if a is None or b is None:
            return a is b
        return a.sizes == b.sizes and torch.equal(a.A, b.A) and torch.equal(a.B, b.B)

    if not all(same(m.down_rotation, maths[0].down_rotation) for m in maths):
        raise HaqError("the MoE layers rotate their experts' down inputs differently, and the engine runs one "
                       "rotation for all: quantize with --rotate auto or on (one seeded rotation per width)")
    return maths[0]


def extract_experts(experts: nn.Module) -> tuple[list[ExpertWeights], ExpertMath]:
    """Per-expert host tensors of a fused experts module (Int8Experts or transformers' float one)."""
    if isinstance(experts, Int8Experts):
        static = experts.gate_up_in_scale is not None
        weights = [ExpertWeights(experts.gate_up_q[e].clone(), experts.down_q[e].clone(),
                                 experts.gate_up_scale[e].clone(), experts.down_scale[e].clone(),
                                 experts.gate_up_in_scale[e].clone() if static else None,
                                 experts.down_in_scale[e].clone() if static else None)
                   for e in range(experts.num_experts)]
        return weights, ExpertMath(experts.act_fn, experts.act_bits, experts.act_mode, experts.impl,
                                   experts.down_rotation)
    weights = [ExpertWeights(experts.gate_up_proj.data[e].clone(), experts.down_proj.data[e].clone())
               for e in range(experts.gate_up_proj.shape[0])]
    return weights, ExpertMath(experts.act_fn)


class ExpertStore:
    """All experts of all MoE layers in host memory."""

    def __init__(self, per_layer: list[list[ExpertWeights]], math: ExpertMath, pin: bool = False):
        sizes = {w.nbytes for experts in per_layer for w in experts}
        if len(sizes) != 1:
            raise HaqError(f"experts of one model must all have the same size; found {sorted(sizes)} bytes")
        self.layers = [[w.pin() if pin else w for w in experts] for experts in per_layer]
        self.math = math
        # a layer's CPU calls in one kernel call, where the kernel supports the experts' math
        first = per_layer[0][0]
        if first.gate_up_scale is None:  # float experts
            grouped = (GroupedExperts.supports_float(math.act_fn, first.gate_up, first.down)
                       and math.down_rotation is None)
        else:
            grouped = GroupedExperts.supports(math.act_fn, math.act_bits, math.act_mode,
                                              first.gate_up_in_scale is not None, torch.device("cpu"))
        self.grouped = [GroupedExperts([w.gate_up for w in experts], None if first.gate_up_scale is None else
                                       [w.gate_up_scale for w in experts], [w.down for w in experts],
                                       None if first.gate_up_scale is None else [w.down_scale for w in experts],
                                       math.act_bits, down_rotation=math.down_rotation)
                        for experts in self.layers] if grouped else None

    def __getitem__(self, key: Key) -> ExpertWeights:
        layer, expert = key
        return self.layers[layer][expert]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return len(self.layers[0])

    @property
    def expert_bytes(self) -> int:
        return self.layers[0][0].nbytes

    @property
    def total_bytes(self) -> int:
        return sum(w.nbytes for experts in self.layers for w in experts)
