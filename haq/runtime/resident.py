"""The engine's decode step when every expert is resident on its device, as one static step.

With the whole expert set in the device cache the policy has nothing left to decide, and the
per-call path only costs: a host sync per MoE layer to read the routing, and a few launches per
routed expert. Here each MoE layer's cached copies are stacked into one tensor per weight (the
cache's per-expert entries become views of it, so the device bytes stay what the engine
counts), and the layer runs from the stacks with the routing kept on the device
(`haq.kernels.device_moe`). The decode step is then `haq.runtime.graphed_decode`'s: on CUDA it is
captured once and replayed.

Steps taken this way are not the engine's calls: no routing is recorded and no counter moves
(every call would be a hit). When the block is left the offloading modules come back and the
cache entries get their own copies again, a layer at a time.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from haq.errors import HaqError
from haq.kernels import device_moe, triton_int8
from haq.models.adapters import adapter_for
from haq.runtime.graphed_decode import GraphedDecoder
from haq.runtime.store import ExpertMath, ExpertWeights

if TYPE_CHECKING:
    from haq.runtime.engine import Engine

FIELDS = ("gate_up", "down", "gate_up_scale", "down_scale")


class ResidentExperts(nn.Module):
    """A MoE layer's experts from stacked device tensors; same forward as the module it stands in for."""

    def __init__(self, stacks: dict[str, torch.Tensor | None], math: ExpertMath) -> None:
        super().__init__()
        self.stacks, self.math = stacks, math

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        s = self.stacks
        if s["gate_up_scale"] is None:
            return device_moe.float_experts(hidden_states, top_k_index, top_k_weights, s["gate_up"], s["down"],
                                            self.math.act_fn)
        return device_moe.int8_experts(hidden_states, top_k_index, top_k_weights, s["gate_up"], s["gate_up_scale"],
                                       s["down"], s["down_scale"], self.math.act_fn, self.math.act_bits,
                                       self.math.down_rotation)


def static_step_refusal(engine: Engine) -> str | None:
    """Why the engine's experts cannot run as a static step, or None."""
    math, first = engine.store.math, engine.store[(0, 0)]
    missing = engine.store.num_layers * engine.store.num_experts - len(engine.cache)
    if missing:
        return (f"{missing} experts are not resident: a static step needs every expert on the device "
                f"(a budget of at least {engine.store.total_bytes} B, all of the experts' bytes)")
    if first.gate_up_scale is None:
        if math.down_rotation is not None:
            return "rotated float experts have no grouped path"
        if engine.device.type != "cuda":
            return None
        major, minor = torch.cuda.get_device_capability(engine.device)
        if first.gate_up.dtype != torch.bfloat16 or major not in (9, 10):
            return ("float experts run on torch._grouped_mm, whose sync-free CUDA path takes bfloat16 on "
                    f"Hopper or Blackwell GPUs (here {first.gate_up.dtype} on sm{major}{minor})")
        return None
    return triton_int8.device_path_refusal(math.act_bits, math.act_mode, first.gate_up_in_scale is not None,
                                           engine.device)


def _stack(engine: Engine, layer: int) -> dict[str, torch.Tensor | None]:
    """The layer's cached copies as one tensor per weight; the cache keeps views of them."""
    keys = [(layer, e) for e in range(engine.store.num_experts)]
    for key in keys:
        engine.ready(key, engine.cache[key])  # a copy still landing is waited for on the compute stream
    stacks = {f: (None if getattr(engine.cache[keys[0]], f) is None else
                  torch.stack([getattr(engine.cache[k], f) for k in keys])) for f in FIELDS}
    for e, key in enumerate(keys):
        engine.cache[key] = ExpertWeights(*(None if stacks[f] is None else stacks[f][e] for f in FIELDS))
    return stacks


@contextmanager
def static_step(engine: Engine, max_len: int, batch: int = 1, graphs: bool | None = None) -> Iterator[GraphedDecoder]:
    """A `GraphedDecoder` over the engine's model with every expert resident (CUDA graphs on a GPU,
    eager elsewhere); the engine's offloading modules are put back afterwards."""
    why = static_step_refusal(engine)
    if why is not None:
        raise HaqError(f"the engine cannot decode as a static step: {why}")
    adapter = adapter_for(engine.model.config)
    layers = [adapter.decoder_layers(engine.model)[i] for i in engine.moe_layer_index]
    offloaded = [layer.get_submodule(adapter.moe.experts) for layer in layers]
    decoder = None
    try:
        for index, layer in enumerate(layers):
            layer.set_submodule(adapter.moe.experts, ResidentExperts(_stack(engine, index), engine.store.math))
        decoder = GraphedDecoder(engine.model, max_len, batch, graphs)
        yield decoder
    finally:
        if decoder is not None:
            decoder.close()  # its graph reads the stacks, which go below
        for index, (layer, module) in enumerate(zip(layers, offloaded)):
            layer.set_submodule(adapter.moe.experts, module)
            _unstack(engine, index)


def _unstack(engine: Engine, layer: int) -> None:
    """Own copies for the layer's cache entries again (one layer at a time), so evicting one
    expert frees its bytes, as the engine counts them."""
    for e in range(engine.store.num_experts):
        key = (layer, e)
        if key in engine.cache:
            engine.cache[key] = engine.cache[key].copy()
