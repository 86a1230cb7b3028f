"""Expert routing statistics: which experts each MoE layer picks, counted during any forward."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from haq.errors import HaqError
from haq.models.adapters import adapter_for


@contextmanager
def routing_counter(model: nn.Module):
    """Yields counts [MoE layers, experts] (int64) filled in by every forward inside the block."""
    adapter = adapter_for(model.config)
    if adapter.moe is None:
        raise HaqError(f"{model.config.model_type} is a dense model: routing statistics need an MoE model")
    layers = [adapter.decoder_layers(model)[i] for i in adapter.moe_layers(model.config)]
    num_experts = getattr(model.config, adapter.moe.num_experts_attr)
    counts = torch.zeros(len(layers), num_experts, dtype=torch.int64)

    def hook(index):
        def record(_module, _inputs, output):
            indices, _ = adapter.moe.choices(output)
            counts[index] += torch.bincount(indices.reshape(-1).cpu(), minlength=num_experts)
        return record

    handles = [layer.get_submodule(adapter.moe.router).register_forward_hook(hook(i))
               for i, layer in enumerate(layers)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def frequency_skew(counts: torch.Tensor) -> list[float]:
    """Per layer max/min expert frequency (inf when an expert is never chosen)."""
    counts = counts.double()
    return [float(row.max() / row.min()) if row.min() > 0 else float("inf") for row in counts]
