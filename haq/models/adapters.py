"""Architecture adapters as data: per family, where the decoder layers are, what their norms
compute, and per layer (`layer_spec(config, i)`: dense or MoE, with or without shared experts)
which op feeds which linears (smoothing groups), the linears in true-sequential order, where
experts and routers live and which modules write into the residual stream. A new model family is
one `ArchAdapter(...)` entry (plus its names in `checkpoint/compressed_tensors.py` to export it).

Paths are relative to one decoder layer. Fused 3-D experts (transformers 5.x) are addressed by the
experts module path; their weights are `gate_up_proj` [E, 2I, H] (gate rows first) and
`down_proj` [E, H, I].
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from haq.errors import HaqError
from haq.models.norms import NormKind, check_norm


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
    reads_residual: bool = True  # a norm group whose norm normalizes the residual stream (not an inner norm)


@dataclass(frozen=True)
class MoeSpec:
    block: str  # the sparse MoE block
    router: str
    experts: str  # fused routed experts (the runtime offloads these)
    top_k_attr: str
    num_experts_attr: str
    shared_expert: str | None = None  # dense MLP(s) every token runs (stay on the device)
    shared_expert_gate: str | None = None

    @staticmethod
    def choices(router_output: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k indices [T, K], top-k weights [T, K]) from a router's output: transformers 5.x
        routers return (logits, top-k weights, top-k indices)."""
        return router_output[2], router_output[1]


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer's structure."""

    linears: tuple[str, ...]  # quantized dense linears, true-sequential order
    groups: tuple[SmoothGroup, ...]
    moe: MoeSpec | None = None
    high_precision: tuple[str, ...] = ()  # read but never quantized (routers, shared-expert gates)
    writers: tuple[str, ...] = ()  # modules that write into the residual stream (fused experts: their down)
    online: tuple[str, ...] = ()  # dense linears whose inputs are rotated at run time (down_proj)
    norm_kind: NormKind = "rms"
    attention: str = "self_attn"  # the attention block (its output is reused while only the MLP changes)

    def touches_attention(self, group: SmoothGroup) -> bool:
        """Does smoothing `group` change what the attention block computes?"""
        return any(p == self.attention or p.startswith(self.attention + ".")
                   for p in (group.prev, *group.consumers, *group.rescale))

    @property
    def norm_groups(self) -> tuple[SmoothGroup, ...]:
        """Groups fed by a norm (of the residual stream, or an inner one such as MLA's)."""
        return tuple(g for g in self.groups if g.kind == "norm")

    @property
    def residual_groups(self) -> tuple[SmoothGroup, ...]:
        """Groups fed by a norm of the residual stream: the places where the stream is read."""
        return tuple(g for g in self.norm_groups if g.reads_residual)


@dataclass(frozen=True)
class Residual:
    """Model-level paths of the residual stream (for its rotation)."""

    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"


@dataclass(frozen=True)
class ArchAdapter:
    model_types: tuple[str, ...]
    layers: str
    dense: LayerSpec | None = None  # the structure of dense layers (None: the family has none)
    sparse: LayerSpec | None = None  # the structure of MoE layers
    is_sparse: Callable[[object, int], bool] = lambda config, i: True  # (config, layer) -> MoE layer?
    moe: MoeSpec | None = None  # the family's MoE block (None: a dense family)
    norm_kind: NormKind = "rms"
    residual: Residual | None = None  # None: the residual stream cannot be rotated
    spec_for: Callable[[object, int], LayerSpec] | None = None  # config-dependent structures (MLA)

    def layer_spec(self, config, index: int) -> LayerSpec:
        if self.spec_for is not None:
            spec = self.spec_for(config, index)
        elif self.sparse is not None and (self.dense is None or self.is_sparse(config, index)):
            spec = self.sparse
        else:
            spec = self.dense
        return replace(spec, norm_kind=self.norm_kind)

    def moe_layers(self, config) -> list[int]:
        """Indices of the decoder layers with routed experts."""
        return [i for i in range(config.num_hidden_layers) if self.layer_spec(config, i).moe is not None]

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def check_norms(self, model: nn.Module, layers: bool = True) -> None:
        """Every norm a fold may touch computes what `norm_kind` says, or a clear error
        (`layers=False`: the final norm only; offloaded layers are checked as they load)."""
        for index, layer in enumerate(self.decoder_layers(model)) if layers else ():
            self.check_layer_norms(model.config, index, layer)
        if self.residual is not None:
            check_norm(model.get_submodule(self.residual.final_norm), self.norm_kind, self.residual.final_norm)

    def check_layer_norms(self, config, index: int, layer: nn.Module) -> None:
        for group in self.layer_spec(config, index).norm_groups:
            check_norm(layer.get_submodule(group.prev), self.norm_kind, f"layer {index} {group.prev}")


def input_weight(module: nn.Module) -> nn.Parameter:
    """The parameter whose last dimension is `module`'s input: fused experts' gate_up, else weight."""
    return module.gate_up_proj if hasattr(module, "gate_up_proj") else module.weight


ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
V_TO_O = SmoothGroup("v->o", "self_attn.v_proj", ("self_attn.o_proj",), kind="linear",
                     repeat_attr="self_attn.num_key_value_groups")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
DENSE_MLP_LINEARS = GATE_UP + ("mlp.down_proj",)
UP_TO_DOWN = SmoothGroup("up->down", "mlp.up_proj", ("mlp.down_proj",), kind="linear")
ROUTED_UP_TO_DOWN = SmoothGroup("up->down", "mlp.experts", ("mlp.experts",), kind="experts-up")


def _gated_dense(attn_linears: tuple[str, ...], attn_groups: tuple[SmoothGroup, ...],
                 mlp_norm: str = "post_attention_layernorm") -> LayerSpec:
    """Attention, then a gated MLP (gate/up -> down)."""
    return LayerSpec(linears=attn_linears + DENSE_MLP_LINEARS,
                     groups=attn_groups + (SmoothGroup("norm->mlp", mlp_norm, GATE_UP), UP_TO_DOWN),
                     writers=("self_attn.o_proj", "mlp.down_proj"), online=("mlp.down_proj",))


def _moe(attn_linears: tuple[str, ...], attn_groups: tuple[SmoothGroup, ...], moe: MoeSpec,
         shared: str | None = None) -> LayerSpec:
    """Attention, then a router and fused experts, with or without a shared dense expert `shared`."""
    shared_linears = tuple(f"{shared}.{n}" for n in ("gate_proj", "up_proj", "down_proj")) if shared else ()
    gates = (moe.router,) + ((moe.shared_expert_gate,) if moe.shared_expert_gate else ())
    groups = attn_groups + (
        SmoothGroup("norm->experts", "post_attention_layernorm", (moe.experts,) + shared_linears[:2], rescale=gates),
        ROUTED_UP_TO_DOWN,
    )
    if shared:
        groups += (SmoothGroup("shared up->down", shared_linears[1], shared_linears[2:], kind="linear"),)
    return LayerSpec(linears=attn_linears + shared_linears, groups=groups, moe=moe, high_precision=gates,
                     writers=("self_attn.o_proj", moe.experts) + shared_linears[2:])


LLAMA_ATTN = (ATTN + ("self_attn.o_proj",), (SmoothGroup("norm->qkv", "input_layernorm", ATTN), V_TO_O))
LLAMA = ArchAdapter(model_types=("llama", "mistral"), layers="model.layers", dense=_gated_dense(*LLAMA_ATTN),
                    residual=Residual())


def _routed_experts_only(model_types: tuple[str, ...], num_experts_attr: str, **kwargs) -> ArchAdapter:
    """Mixtral-style blocks: attention, then a router and fused experts (no shared expert)."""
    moe = MoeSpec(block="mlp", router="mlp.gate", experts="mlp.experts", top_k_attr="num_experts_per_tok",
                  num_experts_attr=num_experts_attr)
    return ArchAdapter(model_types=model_types, layers="model.layers", sparse=_moe(*LLAMA_ATTN, moe), moe=moe,
                       residual=Residual(), **kwargs)


def _qwen_sparse(config, index: int) -> bool:
    """Qwen2/3-MoE: layers listed in mlp_only_layers, or off the decoder_sparse_step grid, are dense."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (index not in (getattr(config, "mlp_only_layers", None) or []) and getattr(config, "num_experts", 0) > 0
            and (index + 1) % step == 0)


MIXTRAL = _routed_experts_only(("mixtral",), "num_local_experts")
QWEN2_MOE_BLOCK = MoeSpec(block="mlp", router="mlp.gate", experts="mlp.experts", top_k_attr="num_experts_per_tok",
                          num_experts_attr="num_experts", shared_expert="mlp.shared_expert",
                          shared_expert_gate="mlp.shared_expert_gate")
QWEN2_MOE = ArchAdapter(
    model_types=("qwen2_moe",), layers="model.layers", dense=_gated_dense(*LLAMA_ATTN),
    sparse=_moe(*LLAMA_ATTN, QWEN2_MOE_BLOCK, shared="mlp.shared_expert"), moe=QWEN2_MOE_BLOCK,
    is_sparse=_qwen_sparse, residual=Residual())
QWEN3_MOE = _routed_experts_only(("qwen3_moe",), "num_experts", dense=_gated_dense(*LLAMA_ATTN),
                                 is_sparse=_qwen_sparse)


def _deepseek_attention(config) -> tuple[tuple[str, ...], tuple[SmoothGroup, ...]]:
    """MLA: the input norm feeds the query (or its low-rank down projection) and the joint KV down
    projection; the low-rank norms feed the up projections. kv_b's v rows feed o_proj per head
    through the latent attention, so v -> o is left unsmoothed."""
    a = "self_attn."
    kv_a = a + "kv_a_proj_with_mqa"
    if getattr(config, "q_lora_rank", None):
        q_down = (a + "q_a_proj",)
        linears = q_down + (kv_a, a + "q_b_proj", a + "kv_b_proj", a + "o_proj")
        inner = (SmoothGroup("q_a_norm->q_b", a + "q_a_layernorm", (a + "q_b_proj",), reads_residual=False),)
    else:
        q_down = (a + "q_proj",)
        linears = q_down + (kv_a, a + "kv_b_proj", a + "o_proj")
        inner = ()
    groups = (SmoothGroup("norm->q,kv_a", "input_layernorm", q_down + (kv_a,)), *inner,
              SmoothGroup("kv_a_norm->kv_b", a + "kv_a_layernorm", (a + "kv_b_proj",), reads_residual=False))
    return linears, groups


DEEPSEEK_MOE = MoeSpec(block="mlp", router="mlp.gate", experts="mlp.experts", top_k_attr="num_experts_per_tok",
                       num_experts_attr="n_routed_experts", shared_expert="mlp.shared_experts")


def _deepseek_layer(config, index: int) -> LayerSpec:
    """DeepSeek-V2/V3: the first `first_k_dense_replace` layers are dense, the rest MoE with shared experts."""
    attn = _deepseek_attention(config)
    if index < getattr(config, "first_k_dense_replace", 0):
        return _gated_dense(*attn)
    return _moe(*attn, DEEPSEEK_MOE, shared="mlp.shared_experts")


DEEPSEEK = ArchAdapter(model_types=("deepseek_v2", "deepseek_v3"), layers="model.layers", moe=DEEPSEEK_MOE,
                       spec_for=_deepseek_layer, residual=Residual())
# Gemma3: norms compute x * (1 + w); the MLP reads pre_feedforward_layernorm, and post-norms sit on
# the residual writers (o_proj, down_proj), so the residual stream cannot be rotated.
GEMMA3 = ArchAdapter(model_types=("gemma3_text",), layers="model.layers",
                     dense=_gated_dense(*LLAMA_ATTN, mlp_norm="pre_feedforward_layernorm"), norm_kind="rms_offset")
# OPT: LayerNorms with bias; ReLU between fc1 and fc2 is positively homogeneous, so fc1 -> fc2
# smoothing is exact too.
OPT = ArchAdapter(
    model_types=("opt",), layers="model.decoder.layers", norm_kind="layernorm",
    dense=LayerSpec(
        linears=ATTN + ("self_attn.out_proj", "fc1", "fc2"),
        groups=(
            SmoothGroup("norm->qkv", "self_attn_layer_norm", ATTN),
            SmoothGroup("v->o", "self_attn.v_proj", ("self_attn.out_proj",), kind="linear"),
            SmoothGroup("norm->fc1", "final_layer_norm", ("fc1",)),
            SmoothGroup("fc1->fc2", "fc1", ("fc2",), kind="linear"),
        )),
)
ADAPTERS = (LLAMA, MIXTRAL, QWEN2_MOE, QWEN3_MOE, DEEPSEEK, GEMMA3, OPT)
SUPPORTED = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config) -> ArchAdapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise HaqError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)}")


def is_moe(config) -> bool:
    return adapter_for(config).moe is not None
