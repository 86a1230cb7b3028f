"""Rotations before quantization (QuaRot / SpinQuant style). Offline: an orthogonal Q turns the
residual stream h into h Q. RMSNorm commutes with it once its weight is folded into the linears
that read it, so the rewrite is exact and the model keeps its architecture and its int8 kernels.

Why: per-token int8 activations lose most on tokens whose normalized activations are dominated by
a few huge channels (the attention-sink token of every window). Q spreads such a channel over all
channels, so the token's per-token scale drops by up to sqrt(hidden) and its other channels keep
their bits.

The MLP's inner activations (down_proj inputs, dense and every routed expert's) sit behind a
nonlinearity, so no offline rewrite reaches them: `OnlineRotation` turns them into x R at run time
(R = A kron B, n(a+b) multiply-adds per token rather than n^2) with the weight stored as W R; the
int8 linear (or `Int8Experts`, one R for all experts of a layer) applies it before quantizing.

Rewrite, with row vectors (y = x W^T): readers of a norm W <- (W diag(g)) Q and g <- 1; writers into
the residual (o_proj, down_proj, every expert's down) W <- Q^T W, bias b <- b Q; embedding E <- E Q;
lm_head (after the final norm) like a reader. A tied lm_head is untied first.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from haq.errors import HaqError
from haq.kernels.moe import dispatch, gated_mlp, per_expert
from haq.kernels.rotation import OnlineRotation, has_hadamard, rotation_matrix
from haq.models.adapters import ADAPTERS, adapter_for, input_weight
from haq.models.norms import NormKind, norm_gain, set_norm_gain


def _per_matrix(weight: torch.Tensor, fn) -> None:
    """weight <- fn(weight) in place, one expert's matrix at a time for fused experts [E, ...]: the
    float64 products of a Mixtral layer's experts at once would take 15 GB (`scale.md`'s bound)."""
    for w in (weight.data if weight.ndim == 3 else [weight.data]):
        w.copy_(fn(w.double()).to(w.dtype))


def _rotate_reader(module: nn.Module, gain: torch.Tensor, Q: torch.Tensor) -> None:
    _per_matrix(input_weight(module), lambda w: (w * gain) @ Q)


def _rotate_writer(module: nn.Module, Q: torch.Tensor) -> None:
    fused = hasattr(module, "down_proj") and isinstance(module.down_proj, nn.Parameter)  # experts [E, H, I]
    _per_matrix(module.down_proj if fused else module.weight, lambda w: Q.T @ w)
    if getattr(module, "bias", None) is not None:
        module.bias.data = (module.bias.data.double() @ Q).to(module.bias.dtype)


def _fold_norm(norm: nn.Module, kind: NormKind, where: str) -> torch.Tensor:
    """The norm's gain, which its readers absorb; the norm keeps a gain of ones."""
    if getattr(norm, "bias", None) is not None:
        raise HaqError(f"{where}: a norm with a bias (LayerNorm) does not commute with a rotation")
    gain = norm_gain(norm, kind).double().clone()
    set_norm_gain(norm, kind, torch.ones_like(gain))
    return gain


@torch.no_grad()
def rotate_ends(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Rotate what lies outside the decoder layers (embedding, final norm, lm_head) and return Q;
    each layer then takes `rotate_layer` with the same Q, so an offloaded model rotates as it loads."""
    adapter = adapter_for(model.config)
    spec = adapter.residual
    if spec is None:
        supported = ", ".join(t for a in ADAPTERS if a.residual is not None for t in a.model_types)
        raise HaqError(f"--rotate is not supported for {model.config.model_type!r} (its norms subtract the mean "
                       f"or sit on the residual writers); supported: {supported}")
    adapter.check_norms(model, layers=False)
    embed, lm_head = model.get_submodule(spec.embed), model.get_submodule(spec.lm_head)
    if lm_head.weight.data_ptr() == embed.weight.data_ptr():  # tied
        lm_head.weight = nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
    Q = rotation_matrix(embed.weight.shape[1], seed)
    _rotate_reader(lm_head, _fold_norm(model.get_submodule(spec.final_norm), adapter.norm_kind, spec.final_norm), Q)
    embed.weight.data = (embed.weight.data.double() @ Q).to(embed.weight.dtype)
    return Q


@torch.no_grad()
def rotate_layer(config, index: int, layer: nn.Module, Q: torch.Tensor, online: bool, seed: int = 0,
                 hadamard_only: bool = False) -> None:
    """Rotate decoder layer `index` into the residual basis of `rotate_ends`' Q: its norms fold into
    their readers, its writers turn by Q^T; with `online`, its online-rotated inputs too (with
    `hadamard_only`, those of widths with a Hadamard matrix, which export)."""
    adapter = adapter_for(config)
    adapter.check_layer_norms(config, index, layer)
    layer_spec = adapter.layer_spec(config, index)
    for group in layer_spec.residual_groups:
        gain = _fold_norm(layer.get_submodule(group.prev), adapter.norm_kind, f"layer {index} {group.prev}")
        for name in group.consumers + group.rescale:
            _rotate_reader(layer.get_submodule(name), gain, Q)
    for name in layer_spec.writers:
        _rotate_writer(layer.get_submodule(name), Q)
    if online:
        _rotate_layer_online(layer, layer_spec, seed, hadamard_only)


def rotate_residual(model: nn.Module, seed: int = 0) -> None:
    """Rotate `model`'s residual stream in place; its float function is unchanged. Every norm is
    checked first, so a norm that cannot fold fails before any weight turns."""
    adapter = adapter_for(model.config)
    if adapter.residual is not None:
        adapter.check_norms(model)
    Q = rotate_ends(model, seed)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        rotate_layer(model.config, index, layer, Q, online=False, seed=seed)


def _rotate_input(module: nn.Module, args: tuple) -> tuple:
    return (module.online_rotation(args[0]), *args[1:])


def _rotate_layer_online(layer: nn.Module, layer_spec, seed: int, hadamard_only: bool = False) -> None:
    """The layer's online-rotated inputs: its dense down_proj(s) and its routed experts' down; with
    `hadamard_only`, only widths with a Hadamard matrix."""
    def wanted(width: int) -> bool:
        return not hadamard_only or has_hadamard(width)

    for name in layer_spec.online:
        linear = layer.get_submodule(name)
        if not wanted(linear.in_features):
            continue
        rotation = OnlineRotation.seeded(linear.in_features, seed).to(linear.weight.device)
        linear.weight.data = rotation(linear.weight.data.float()).to(linear.weight.dtype)
        linear.online_rotation = rotation
        linear.register_forward_pre_hook(_rotate_input)
    if layer_spec.moe is not None:
        experts = layer.get_submodule(layer_spec.moe.experts)
        if wanted(experts.down_proj.shape[-1]):
            _rotate_experts_down(experts, seed)


def _rotated_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' fused experts' forward with every down input turned online: x R times W R."""
    def expert(e: int, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, lambda v: F.linear(v, self.gate_up_proj[e]),
                         lambda h: F.linear(self.down_rotation(h), self.down_proj[e]), self.act_fn)

    return dispatch(hidden_states, top_k_index, top_k_weights, per_expert(expert))


_ROTATED_CLASSES: dict[type, type] = {}


def _rotated_class(cls: type) -> type:
    """`cls` with `_rotated_experts_forward` as its forward. A class, not a bound method stored on
    the instance: that would be a reference cycle, and an offloaded layer released while in one
    stays in memory (a whole Mixtral layer's experts, 5.6 GB) until the cyclic collector runs."""
    if cls not in _ROTATED_CLASSES:
        _ROTATED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _rotated_experts_forward,
                                                            "__module__": cls.__module__})
    return _ROTATED_CLASSES[cls]


def _rotate_experts_down(experts: nn.Module, seed: int) -> None:
    """Every expert's down weight W <- W R with one R for the layer, and the module's forward turns
    the down inputs (exact in float); quantization carries `down_rotation` into `Int8Experts`."""
    rotation = OnlineRotation.seeded(experts.down_proj.shape[-1], seed).to(experts.down_proj.device)
    for w in experts.down_proj.data:  # one expert at a time, in place
        w.copy_(rotation(w.float()).to(w.dtype))
    experts.down_rotation = rotation
    experts.__class__ = _rotated_class(type(experts))


@torch.no_grad()
def rotate_online_inputs(model: nn.Module, seed: int = 0) -> None:
    """Rotate the inputs of the online-rotated linears (dense down_proj: W <- W R and a pre-hook
    x -> x R) and of the routed experts' down, exact in float. Quantization carries `online_rotation`
    into the int8 module and `down_rotation` into `Int8Experts`."""
    adapter = adapter_for(model.config)
    if adapter.residual is None:
        return
    for index, layer in enumerate(adapter.decoder_layers(model)):
        _rotate_layer_online(layer, adapter.layer_spec(model.config, index), seed)
