"""Record routing traces from a real model: which experts every token picks in every MoE layer."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from haq.errors import HaqError
from haq.models.adapters import adapter_for
from haq.runtime.prefetch import PREFETCH_DISTANCE
from haq.runtime.trace import Trace, TraceMeta


@torch.no_grad()
def record_trace(model: nn.Module, windows: torch.Tensor, model_name: str, source: str = "hf-hooks",
                 progress: bool = True, pregate_distance: int = PREFETCH_DISTANCE) -> Trace:
    """Run each window [n, seqlen] through the model and keep every router's top-k choices, and
    next to them the pre-gate predictions: each router applied to the router input of the MoE
    layer `pregate_distance` earlier (what an engine can compute that early; -1 in the first
    layers). T = tokens, L = MoE layers, K = top-k."""
    adapter = adapter_for(model.config)
    if adapter.moe is None:
        raise HaqError(f"{model.config.model_type} is a dense model: it has no routing to trace")
    layers = [adapter.decoder_layers(model)[i] for i in adapter.moe_layers(model.config)]
    routers = [layer.get_submodule(adapter.moe.router) for layer in layers]
    d = min(pregate_distance, len(layers) - 1) if len(layers) > 1 else 0
    current: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
    early: list[torch.Tensor | None] = [None] * len(layers)

    def hook(index):
        def grab(_module, inputs, output):
            indices, weights = adapter.moe.choices(output)
            current[index] = (indices.cpu(), weights.float().cpu())
            if d and index + d < len(routers):  # .forward: that router's own hook must not fire
                early[index + d] = adapter.moe.choices(routers[index + d].forward(inputs[0]))[0].cpu()
        return grab

    handles = [router.register_forward_hook(hook(i)) for i, router in enumerate(routers)]
    experts, weights, pregate, seq_id, pos = [], [], [], [], []
    try:
        for s, window in enumerate(tqdm(windows, desc="trace", disable=not progress, leave=False)):
            model(window[None].to(next(model.parameters()).device), use_cache=False)
            experts.append(torch.stack([c[0] for c in current], dim=1))  # [T, L, K]
            weights.append(torch.stack([c[1] for c in current], dim=1))
            if d:
                early[:d] = [torch.full_like(c[0], -1) for c in current[:d]]  # nothing precedes them by d
                pregate.append(torch.stack(early, dim=1))
            seq_id.append(torch.full((window.numel(),), s, dtype=torch.int32))
            pos.append(torch.arange(window.numel(), dtype=torch.int32))
    finally:
        for h in handles:
            h.remove()
    config = model.config
    meta = TraceMeta(model=model_name, num_experts=getattr(config, adapter.moe.num_experts_attr),
                     layers=len(layers), top_k=getattr(config, adapter.moe.top_k_attr), source=source,
                     extra={"pregate_distance": d} if d else {})
    return Trace(experts=torch.cat(experts).numpy().astype(np.int16), seq_id=torch.cat(seq_id).numpy(),
                 pos=torch.cat(pos).numpy(), meta=meta, weights=torch.cat(weights).numpy().astype(np.float16),
                 pregate=torch.cat(pregate).numpy().astype(np.int16) if d else None)
