"""Architecture adapters as data: per family, where the decoder layers are, which op feeds which
linears (smoothing groups), the linears in true-sequential order, and where experts and routers
live. A new model family is one `ArchAdapter(...)` entry.

Paths are relative to one decoder layer. Fused 3-D experts (transformers 5.x) are addressed by the
experts module path; their weights are `gate_up_proj` [E, 2I, H] (gate rows first) and
`down_proj` [E, H, I].
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from haq.errors import HaqError


@dataclass(frozen=True)
class SmoothGroup:
    """Consumers whose input is produced by `prev`: scaling prev's output channels by 1/s and the
    consumers' input columns by s leaves the function unchanged.

    kind: "norm" (prev is a norm: scale its weight and bias), "linear" (prev is a linear: scale
    its output rows and bias), "experts-up" (inside each expert: up rows of gate_up -> down).
    `repeat` > 1 when prev's outputs feed `repeat` consumer channels each (grouped-query v -> o).
    `rescale` lists modules that read the same input but stay high precision (routers, shared
    expert gates): their columns are scaled so they compute exactly what they did.
    """

    name: str
    prev: str
    consumers: tuple[str, ...]
    kind: str = "norm"
    rescale: tuple[str, ...] = ()
    repeat_attr: str | None = None  # attribute path (from the layer) giving `repeat`, e.g. GQA groups


@dataclass(frozen=True)
class MoeSpec:
    block: str  # the sparse MoE block (replaced by the runtime's offloading block)
    router: str
    experts: str
    top_k_attr: str
    num_experts_attr: str
    shared_expert: str | None = None
    shared_expert_gate: str | None = None


@dataclass(frozen=True)
class Residual:
    """Model-level paths of the residual stream (for its rotation): the embedding, the final norm,
    the lm_head, and per layer the modules that write into the stream (fused experts: their down)."""

    writers: tuple[str, ...]
    online: tuple[str, ...] = ()  # dense linears whose inputs are rotated at run time (down_proj)
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"


@dataclass(frozen=True)
class ArchAdapter:
    model_types: tuple[str, ...]
    layers: str
    linears: tuple[str, ...]  # quantized dense linears, true-sequential order
    groups: tuple[SmoothGroup, ...]
    moe: MoeSpec | None = None
    high_precision: tuple[str, ...] = field(default=())  # read but never quantized
    residual: Residual | None = None  # None: the residual stream cannot be rotated (LayerNorm)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    @property
    def norm_groups(self) -> tuple[SmoothGroup, ...]:
        """Groups fed by a norm: the places where the residual stream is read."""
        return tuple(g for g in self.groups if g.kind == "norm")


def input_weight(module: nn.Module) -> nn.Parameter:
    """The parameter whose last dimension is `module`'s input: fused experts' gate_up, else weight."""
    return module.gate_up_proj if hasattr(module, "gate_up_proj") else module.weight


ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
V_TO_O = SmoothGroup("v->o", "self_attn.v_proj", ("self_attn.o_proj",), kind="linear",
                     repeat_attr="self_attn.num_key_value_groups")
LLAMA = ArchAdapter(
    model_types=("llama", "mistral"),
    layers="model.layers",
    linears=ATTN + ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    groups=(
        SmoothGroup("norm->qkv", "input_layernorm", ATTN),
        V_TO_O,
        SmoothGroup("norm->mlp", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        SmoothGroup("up->down", "mlp.up_proj", ("mlp.down_proj",), kind="linear"),
    ),
    residual=Residual(writers=("self_attn.o_proj", "mlp.down_proj"), online=("mlp.down_proj",)),
)
def _routed_experts_only(model_types: tuple[str, ...], num_experts_attr: str) -> ArchAdapter:
    """Mixtral-style blocks: attention, then a router and fused experts (no shared expert)."""
    return ArchAdapter(
        model_types=model_types,
        layers="model.layers",
        linears=ATTN + ("self_attn.o_proj",),
        groups=(
            SmoothGroup("norm->qkv", "input_layernorm", ATTN),
            V_TO_O,
            SmoothGroup("norm->experts", "post_attention_layernorm", ("mlp.experts",), rescale=("mlp.gate",)),
            SmoothGroup("up->down", "mlp.experts", ("mlp.experts",), kind="experts-up"),
        ),
        moe=MoeSpec(block="mlp", router="mlp.gate", experts="mlp.experts",
                    top_k_attr="num_experts_per_tok", num_experts_attr=num_experts_attr),
        high_precision=("mlp.gate",),
        residual=Residual(writers=("self_attn.o_proj", "mlp.experts")),
    )


MIXTRAL = _routed_experts_only(("mixtral",), "num_local_experts")
QWEN2_MOE = ArchAdapter(
    model_types=("qwen2_moe",),
    layers="model.layers",
    linears=ATTN + ("self_attn.o_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                    "mlp.shared_expert.down_proj"),
    groups=(
        SmoothGroup("norm->qkv", "input_layernorm", ATTN),
        V_TO_O,
        SmoothGroup("norm->experts", "post_attention_layernorm",
                    ("mlp.experts", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                    rescale=("mlp.gate", "mlp.shared_expert_gate")),
        SmoothGroup("up->down", "mlp.experts", ("mlp.experts",), kind="experts-up"),
        SmoothGroup("shared up->down", "mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",),
                    kind="linear"),
    ),
    moe=MoeSpec(block="mlp", router="mlp.gate", experts="mlp.experts", top_k_attr="num_experts_per_tok",
                num_experts_attr="num_experts", shared_expert="mlp.shared_expert",
                shared_expert_gate="mlp.shared_expert_gate"),
    high_precision=("mlp.gate", "mlp.shared_expert_gate"),
    residual=Residual(writers=("self_attn.o_proj", "mlp.experts", "mlp.shared_expert.down_proj")),
)
QWEN3_MOE = _routed_experts_only(("qwen3_moe",), "num_experts")
# OPT: LayerNorms with bias; ReLU between fc1 and fc2 is positively homogeneous, so fc1 -> fc2
# smoothing is exact too.
OPT = ArchAdapter(
    model_types=("opt",),
    layers="model.decoder.layers",
    linears=ATTN + ("self_attn.out_proj", "fc1", "fc2"),
    groups=(
        SmoothGroup("norm->qkv", "self_attn_layer_norm", ATTN),
        SmoothGroup("v->o", "self_attn.v_proj", ("self_attn.out_proj",), kind="linear"),
        SmoothGroup("norm->fc1", "final_layer_norm", ("fc1",)),
        SmoothGroup("fc1->fc2", "fc1", ("fc2",), kind="linear"),
    ),
)
ADAPTERS = (LLAMA, MIXTRAL, QWEN2_MOE, QWEN3_MOE, OPT)
SUPPORTED = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config) -> ArchAdapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise HaqError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)}")


def is_moe(config) -> bool:
    return adapter_for(config).moe is not None
