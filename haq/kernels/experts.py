"""Quantized fused experts: a drop-in for transformers 5.x `*Experts` modules (same forward).

E = experts, H = hidden, I = expert intermediate size, T = tokens, K = top-k.
Buffers: gate_up_q int8 [E, 2I, H] (gate rows first), gate_up_scale [E, 2I], down_q int8 [E, H, I],
down_scale [E, H]; with static per-tensor activations also gate_up_in_scale [E] and down_in_scale [E].
act_bits 16 means weight-only: weights are dequantized and activations stay float. `down_rotation`
(`--rotate`): every expert's down input turns by one online rotation x -> x R before it is quantized,
its down weights stored as W R.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from haq.kernels import device_moe, triton_int8
from haq.kernels.backends import get_backend
from haq.kernels.int8 import int8_linear
from haq.kernels.moe import dispatch, gated_mlp, per_expert


class Int8Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn, act_bits: int = 8,
                 act_mode: str = "per-token", impl: str = "auto") -> None:
        super().__init__()
        get_backend(impl)  # validates
        self.impl = impl  # the int8 backend (haq.kernels.backends)
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.act_fn = act_fn
        self.act_bits, self.act_mode = act_bits, act_mode
        self.register_buffer("gate_up_q", torch.zeros(num_experts, 2 * intermediate, hidden, dtype=torch.int8))
        self.register_buffer("gate_up_scale", torch.ones(num_experts, 2 * intermediate))
        self.register_buffer("down_q", torch.zeros(num_experts, hidden, intermediate, dtype=torch.int8))
        self.register_buffer("down_scale", torch.ones(num_experts, hidden))
        static = act_mode == "per-tensor" and act_bits <= 8
        self.register_buffer("gate_up_in_scale", torch.ones(num_experts) if static else None)
        self.register_buffer("down_in_scale", torch.ones(num_experts) if static else None)
        self.down_rotation: nn.Module | None = None

    def _linear(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, in_scale) -> torch.Tensor:
        if self.act_bits > 8:
            return F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None])
        return int8_linear(x, q.t(), scale, act_bits=self.act_bits, act_mode=self.act_mode,
                           static_act_scale=in_scale, impl=self.impl)

    def _rotated(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.down_rotation is None else self.down_rotation(h)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens x [T, H] -> [T, H]."""
        static = self.gate_up_in_scale is not None
        return gated_mlp(
            x,
            lambda v: self._linear(v, self.gate_up_q[e], self.gate_up_scale[e],
                                   self.gate_up_in_scale[e] if static else None),
            lambda h: self._linear(self._rotated(h), self.down_q[e], self.down_scale[e],
                                   self.down_in_scale[e] if static else None),
            self.act_fn)

    def grouped_on_device(self, hidden_states: torch.Tensor) -> bool:
        """Whether the layer runs as grouped Triton launches with the routing kept on the device
        (`haq.kernels.device_moe`: no host sync, CUDA-graph capturable): dynamic per-token W8A8 on
        CUDA under "auto" or "triton", or "triton" under the interpreter (the tests)."""
        device = hidden_states.device
        return ((self.impl == "triton" or (self.impl == "auto" and device.type == "cuda"))
                and triton_int8.device_path_refusal(self.act_bits, self.act_mode, self.gate_up_in_scale is not None,
                                                    device) is None)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states [T, H]; top_k_index, top_k_weights [T, K]
        if self.grouped_on_device(hidden_states):
            return device_moe.int8_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_q,
                                           self.gate_up_scale, self.down_q, self.down_scale, self.act_fn,
                                           self.act_bits, self.down_rotation)
        return dispatch(hidden_states, top_k_index, top_k_weights, per_expert(self.expert_forward))

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"act_bits={self.act_bits}, act_mode={self.act_mode}, impl={self.impl}"
                + (f", down_rotation={self.down_rotation.sizes}" if self.down_rotation is not None else ""))
