"""Quantized modules described as JSON specs, so a checkpoint (or a resumed run) can rebuild the
exact module structure before loading its tensors."""
from __future__ import annotations

from torch import nn

from haq.errors import HaqError
from haq.kernels.experts import Int8Experts
from haq.kernels.int8 import Int8Linear
from haq.kernels.weight_only import WeightOnlyInt8Linear
from haq.kernels.rotation import OnlineRotation


def spec_of(module: nn.Module) -> dict:
    if isinstance(module, Int8Linear):
        return {"type": "int8_linear", "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None, "act_bits": module.act_bits, "act_mode": module.act_mode,
                "static": module.input_scale is not None, "backend": module.impl,
                **({"rotation": list(module.online_rotation.sizes)} if module.online_rotation is not None else {})}
    if isinstance(module, WeightOnlyInt8Linear):
        return {"type": "w8a16_linear", "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None}
    if isinstance(module, Int8Experts):
        return {"type": "int8_experts", "experts": module.num_experts, "hidden": module.hidden_dim,
                "intermediate": module.intermediate_dim, "act_bits": module.act_bits, "act_mode": module.act_mode,
                "backend": module.impl,
                **({"down_rotation": list(module.down_rotation.sizes)} if module.down_rotation is not None else {})}
    raise TypeError(f"not a quantized module: {type(module).__name__}")


def module_from_spec(spec: dict, original: nn.Module) -> nn.Module:
    """An empty quantized module of the spec's shape; `original` supplies what specs do not store
    (the experts' activation function)."""
    kind = spec.get("type")
    if kind == "int8_linear":
        module = Int8Linear(spec["in"], spec["out"], bias=spec["bias"], act_bits=spec["act_bits"],
                            act_mode=spec["act_mode"], static_input_scale=spec["static"],
                            impl=spec.get("backend", "auto"))
        if spec.get("rotation"):
            module.online_rotation = OnlineRotation(*spec["rotation"])
        return module
    if kind == "w8a16_linear":
        return WeightOnlyInt8Linear(spec["in"], spec["out"], bias=spec["bias"])
    if kind == "int8_experts":
        module = Int8Experts(spec["experts"], spec["hidden"], spec["intermediate"], original.act_fn,
                             act_bits=spec["act_bits"], act_mode=spec["act_mode"], impl=spec.get("backend", "auto"))
        if spec.get("down_rotation"):
            module.down_rotation = OnlineRotation(*spec["down_rotation"])
        return module
    raise HaqError(f"unknown quantized module type {kind!r} in checkpoint")


def install_specs(root: nn.Module, specs: dict[str, dict], backend: str | None = None) -> None:
    """Replace the modules named in specs (paths relative to root) by empty quantized ones; with
    `backend`, their int8 GEMMs run on that backend instead of the one the specs record."""
    for name, spec in specs.items():
        try:
            original = root.get_submodule(name)
        except AttributeError:
            raise HaqError(f"checkpoint names module {name!r}, which this architecture does not have") from None
        if backend is not None and spec.get("type") in ("int8_linear", "int8_experts"):
            spec = {**spec, "backend": backend}
        root.set_submodule(name, module_from_spec(spec, original))
