"""Function-preserving outlier injection, to stress activation quantization on small models:
a few channels of every norm are scaled up by `factor` and the matching input columns of every
reader of that norm (linears, every expert, routers) down by the same factor. Float outputs are
unchanged; the activations entering the linears get channels `factor` times larger, as the
outlier channels of large LLMs (SmoothQuant, LLM.int8())."""
from __future__ import annotations

import torch
from torch import nn

from haq.models.adapters import adapter_for, input_weight
from haq.models.norms import norm_gain, set_norm_gain


@torch.no_grad()
def inject_outliers(model: nn.Module, channels: int = 4, factor: float = 50.0, seed: int = 0) -> list[int]:
    adapter = adapter_for(model.config)
    hidden = model.config.hidden_size
    picked = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))[:channels]
    adapter.check_norms(model)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for group in adapter.layer_spec(model.config, index).residual_groups:
            norm = layer.get_submodule(group.prev)
            gain = norm_gain(norm, adapter.norm_kind).clone()
            gain[picked] *= factor
            set_norm_gain(norm, adapter.norm_kind, gain)
            if getattr(norm, "bias", None) is not None:
                norm.bias[picked] *= factor
            for name in group.consumers + group.rescale:
                input_weight(layer.get_submodule(name))[..., picked] /= factor
    return picked.tolist()
