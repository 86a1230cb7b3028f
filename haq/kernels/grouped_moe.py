"""A MoE layer's routed int8 experts in one kernel call (:mod:`haq.kernels.cpu`, ``haq_moe``):
every token quantized once and shared by its experts, gate_up, SiLU(gate) * up, the down input
quantized per (token, expert) pair, down, and the weighted sum in the ascending-expert order of
`haq.kernels.moe.combine`. The same integers as `Int8Experts` computing call by call; float
results equal up to the activation function's rounding (libm's expf against PyTorch's).

It runs a layer of any size: decode steps (its GEMV streams each weight row once for all the rows of
an expert) and prefill chunks (register tiles of 4 rows x 4 weight rows once a weight block is in L1).
A layer of the smollm2-8x135m int8 checkpoint with 2 threads ran faster than or as fast as the experts
call by call on the "auto" backends at 16-512 tokens (`python bench/engine.py --moe-layer`).

Supported: W8A8 with dynamic per-token activations (the default recipe) and a SiLU gate, on the
CPU; and float32 SiLU experts (unquantized: the same steps without the quantization, floats equal
to the module's up to summation order). Anything else (`GroupedExperts.supports` and
`supports_float` are False) runs call by call as before.

T = tokens, H = hidden, I = expert intermediate size, E = experts, P = (token, expert) pairs.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from haq.kernels import cpu
from haq.kernels.grid import qmax_for
from haq.kernels.moe import ExpertCall
from haq.kernels.rotation import OnlineRotation


def is_silu(act_fn: nn.Module) -> bool:
    """transformers' ACT2FN["silu"] is nn.SiLU (or its own SiLUActivation in older releases)."""
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


class GroupedExperts:
    """One layer's experts as the kernel reads them: pointer tables into the caller's int8
    tensors (kept alive here), plus each weight's int32 row sums. Without scales (`float32`) the
    experts are float32 and the kernel runs them unquantized (qmax 0)."""

    def __init__(self, gate_up: Sequence[torch.Tensor], gate_up_scale: Sequence[torch.Tensor] | None,
                 down: Sequence[torch.Tensor], down_scale: Sequence[torch.Tensor] | None, bits: int = 8,
                 down_rotation: OnlineRotation | None = None) -> None:
        self.tensors = [[t.contiguous() for t in group] for group in (gate_up, down)]
        self.intermediate, self.hidden = self.tensors[1][0].shape[1], self.tensors[1][0].shape[0]

        def table(ts: list[torch.Tensor]) -> np.ndarray:
            return np.array([t.data_ptr() for t in ts], dtype=np.int64)

        if gate_up_scale is None or down_scale is None:
            if down_rotation is not None or any(t.dtype != torch.float32 for group in self.tensors for t in group):
                raise ValueError("float experts must be float32 without a down rotation")
            self.qmax = 0
            none = np.zeros(len(self.tensors[0]), dtype=np.int64)
            self.tables = [table(self.tensors[0]), none, none, table(self.tensors[1]), none, none]
            self.rotation = cpu.Rotation()
            return
        self.qmax = qmax_for(bits)
        self.scales = [[s.float().contiguous() for s in group] for group in (gate_up_scale, down_scale)]
        self.sums = [[cpu.row_sums(w) for w in group] for group in self.tensors]
        self.tables = [table(ts) for ts in (self.tensors[0], self.sums[0], self.scales[0], self.tensors[1],
                                            self.sums[1], self.scales[1])]
        self.rotation = cpu.Rotation()  # of the down inputs (every expert's: one per layer); na = 0: none
        if down_rotation is not None:
            self.rotation_factors = [m.float().contiguous() for m in (down_rotation.A, down_rotation.B)]
            A, B = self.rotation_factors
            self.rotation = cpu.Rotation(A.data_ptr(), B.data_ptr(), A.shape[0], B.shape[0])

    @classmethod
    def of_int8_experts(cls, experts) -> GroupedExperts:
        """Kernel tables over an `Int8Experts` module's own weights (no copy); `supports` says whether
        the kernel computes its math."""
        E = experts.num_experts
        return cls([experts.gate_up_q[e] for e in range(E)], [experts.gate_up_scale[e] for e in range(E)],
                   [experts.down_q[e] for e in range(E)], [experts.down_scale[e] for e in range(E)],
                   experts.act_bits, down_rotation=experts.down_rotation)

    @staticmethod
    def supports(act_fn: nn.Module, act_bits: int, act_mode: str, static_scales: bool, device: torch.device) -> bool:
        return (device.type == "cpu" and act_bits <= 8 and act_mode == "per-token" and not static_scales
                and is_silu(act_fn) and cpu.library() is not None)

    @staticmethod
    def supports_float(act_fn: nn.Module, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
        """Float experts the kernel runs: float32 SiLU experts on the CPU."""
        return (all(w.device.type == "cpu" and w.dtype == torch.float32 for w in (gate_up, down)) and is_silu(act_fn)
                and cpu.library() is not None)

    def run(self, hidden: torch.Tensor, calls: Sequence[ExpertCall], top_k_weights: torch.Tensor,
            combined: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """hidden [T, H] float; `calls` in ascending expert order. Combined: the layer's output
        [T, H] (sum over the calls of weight * expert output); else one [n, H] output per call."""
        launch, outputs = self.prepare(hidden, calls, top_k_weights, combined)
        launch()
        return outputs()

    def prepare(self, hidden: torch.Tensor, calls: Sequence[ExpertCall], top_k_weights: torch.Tensor,
                combined: bool = True) -> tuple[Callable[[], None], Callable]:
        """`run` in two halves: the kernel call with its inputs laid out (the closure holds them;
        it may be called again, as `haq profile-hw` times it), and what reads its outputs."""
        x = hidden.float().contiguous()  # held here while the kernel reads it
        T, H, I = x.shape[0], self.hidden, self.intermediate
        token = torch.cat([c.token_idx for c in calls])
        weight = top_k_weights[token, torch.cat([c.k_pos for c in calls])].float().contiguous()
        expert = torch.cat([torch.full((c.tokens,), c.expert, dtype=torch.int64) for c in calls])
        token = token.to(torch.int64).contiguous()
        P = token.numel()
        out = torch.empty(T, H, dtype=torch.float32) if combined else None
        y = None if combined else torch.empty(P, H, dtype=torch.float32)
        work = cpu.scratch(cpu.library().haq_moe_scratch(T, H, I, P))
        t = self.tables

        def launch() -> None:
            cpu.library().haq_moe(
                x.data_ptr(), T, H, I, P, token.data_ptr(), expert.data_ptr(), weight.data_ptr(),
                t[0].ctypes.data, t[1].ctypes.data, t[2].ctypes.data, t[3].ctypes.data, t[4].ctypes.data,
                t[5].ctypes.data, ctypes.byref(self.rotation), self.qmax, None if out is None else out.data_ptr(),
                None if y is None else y.data_ptr(), torch.get_num_threads(), work.data_ptr())

        if combined:
            return launch, lambda: out.to(hidden.dtype)
        return launch, lambda: list(y.to(hidden.dtype).split([c.tokens for c in calls]))
