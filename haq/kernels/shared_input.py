"""Int8 linears that read one input (q/k/v after the attention norm; gate/up after the MLP norm)
run as one GEMM over their concatenated rows: the input is quantized once for all of them and the
weights are read in one pass. The members keep their modules and call sites (HF's attention still
calls q_proj, k_proj, v_proj in turn): the first call computes every member's output, the others
take their slice. Per-token quantization of the same input gives the same levels and the rows'
integer products are independent, so each member's output is what its own call computed.

Members' ``qweight`` become views into the group's concatenated weight (no second copy).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from haq.kernels.int8 import Int8Linear, int8_linear


def fusable(linears: Sequence[nn.Module]) -> bool:
    """Same input features, dynamic per-token activations at the same bits, the same backend, no
    online rotation: then one quantization of the input serves them all."""
    if len(linears) < 2 or not all(isinstance(m, Int8Linear) for m in linears):
        return False
    first = linears[0]
    return all(m.in_features == first.in_features and m.act_bits == first.act_bits and m.act_mode == "per-token"
               and m.input_scale is None and m.online_rotation is None and m.impl == first.impl
               and m.qweight.device == first.qweight.device for m in linears)


class SharedInput:
    """The group: concatenated int8 rows, scales and biases; the last input and its outputs."""

    def __init__(self, linears: Sequence[Int8Linear]) -> None:
        first = linears[0]
        self.act_bits, self.impl = first.act_bits, first.impl
        self.sizes = [m.out_features for m in linears]
        self.qweight = torch.cat([m.qweight for m in linears])
        self.w_scale = torch.cat([m.w_scale for m in linears])
        biased = [m.bias is not None for m in linears]
        self.bias = (torch.cat([m.bias.float() if m.bias is not None else m.w_scale.new_zeros(m.out_features)
                                for m in linears]) if any(biased) else None)
        start = 0
        for index, m in enumerate(linears):
            m.qweight = self.qweight[start:start + m.out_features]  # a view: one copy of the weights
            m.shared = (self, index)
            start += m.out_features
        self._input: tuple | None = None  # (the input, its version) while members still await their part
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._waiting: set[int] = set()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        fresh = self._input is not None and self._input[0] is x and self._input[1] == x._version
        if not fresh or index not in self._waiting:  # a new input (or the same one asked for again)
            y = int8_linear(x, self.qweight.t(), self.w_scale, self.bias, self.act_bits, impl=self.impl)
            self._input, self._outputs = (x, x._version), y.split(self.sizes, dim=-1)
            self._waiting = set(range(len(self.sizes)))
        out = self._outputs[index]
        self._waiting.discard(index)
        if not self._waiting:  # every member has its part: hold nothing until the next input
            self._input, self._outputs = None, ()
        return out


def fuse_shared_inputs(layer: nn.Module, groups: Sequence[Sequence[str]]) -> int:
    """Fuse each group of module paths (relative to `layer`) whose linears allow it; the count fused."""
    fused = 0
    for paths in groups:
        linears = [layer.get_submodule(p) for p in paths]
        if fusable(linears) and not any(getattr(m, "shared", None) for m in linears):
            SharedInput(linears)
            fused += 1
    return fused
