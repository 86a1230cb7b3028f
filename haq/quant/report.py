"""What a quantization run reports: per layer the chosen alphas, damping, fallbacks and time;
for the model the recipe, the quantized modules' specs and the calibration size."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerReport:
    index: int
    alphas: dict[str, float | None] = field(default_factory=dict)
    damp: dict[str, float] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    weights: str = ""  # haq: "gptq", or "rtn" where GPTQ's weights gave the larger block error
    seconds: float = 0.0


@dataclass
class QuantReport:
    recipe: dict
    layers: list[LayerReport]
    modules: dict[str, dict]  # quantized module path -> spec
    seconds: float
    calib_tokens: int
    rotated: bool = False  # whether the residual stream was rotated (the recipe's rotate may say auto)
