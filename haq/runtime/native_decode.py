"""A decode step of a whole W8A8 llama-layout model in one kernel call (`haq_decode_step` in
haq/kernels/cpu): every decoder layer (norms, the fused q/k/v int8 linear, RoPE, the cache write,
attention, o_proj, router, the routed experts or the dense MLP, residuals), the final norm and
the lm_head. The module path spends more time in Python and small torch ops than in its weight
reads at decode sizes (`bench/results/engine-profile.md`: attention, norms and dispatch about
half of a step); here Python is left with the embedding lookup, the rotary table and sampling.

What it runs: Llama, Mistral, Qwen2 (dense) and Mixtral (every layer MoE) whose linears are haq
int8 with dynamic per-token activations (q/k/v fused, as `load_quantized` does; gate/up fused in
dense MLPs), SiLU experts, float32 RMSNorms and router, a float32 or int8 (`quantize_lm_head`)
lm_head, on the CPU, decoding float32 preallocated caches. Anything else (`NativeDecoder.build` says why not) runs the module path.
The same integer products as the module path; floats equal up to rounding order (the norms'
sums, expf, the lm_head's reduction order).

The same models unquantized (every linear and expert float32) run the same step without the
quantization: their q/k/v (and a dense MLP's gate/up) weights are moved into one tensor per
layer, the modules keeping views of it (the same values, no second copy).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from haq.kernels import cpu
from haq.kernels.experts import Int8Experts
from haq.kernels.grid import qmax_for
from haq.kernels.grouped_moe import GroupedExperts, is_silu
from haq.kernels.int8 import Int8Linear
from haq.runtime.kv_cache import PreallocatedLayer

DECODER_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "MixtralDecoderLayer"}
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "MixtralRMSNorm"}
MAX_EXPERTS, MAX_TOP_K, MAX_HEAD_DIM = 1024, 64, 512  # the kernel's stack buffers
DYNAMIC_ROPE = {"dynamic", "longrope"}  # their frequencies depend on the sequence length: no table
STEP_PARTS = ("other", "attention", "router", "expert math", "lm_head")
"""The kernel's timed parts, in its order (`step(seconds=...)`): other = norms, residuals and the
quantization of the q/k/v input; attention = q/k/v, RoPE, the cache write, attention and o_proj;
router = router and routing; expert math = the routed experts (or the dense MLP)."""


class Unsupported(Exception):
    """Why a model runs the module path instead (a reason, not an error)."""


def _contiguous_f32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise Unsupported(f"{what} is {t.dtype} on {t.device.type}, not float32 on the CPU")
    return t.detach().contiguous()


def _plain_int8(m: nn.Module, what: str, rotated: bool = False) -> Int8Linear:
    """`m` as the kernel runs it; `rotated`: an online input rotation is allowed (the down inputs)."""
    if not isinstance(m, Int8Linear):
        raise Unsupported(f"{what} is {type(m).__name__}, not haq's Int8Linear")
    if m.act_bits > 8 or m.act_mode != "per-token" or m.input_scale is not None:
        raise Unsupported(f"{what} is not W8A8 with dynamic per-token activations")
    if m.online_rotation is not None and not rotated:
        raise Unsupported(f"{what} rotates its input online")
    return m


class _Linear:
    """An int8 [N, K] weight as `haq_qlinear` reads it; the tensors are held here."""

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.w = qweight.contiguous()
        self.sums = cpu.row_sums(self.w)
        self.scale = _contiguous_f32(w_scale, "a weight scale")
        self.bias = None if bias is None else _contiguous_f32(bias, "a bias")

    def struct(self) -> cpu.QLinear:
        return cpu.QLinear(self.w.data_ptr(), self.sums.data_ptr(), self.scale.data_ptr(),
                           None if self.bias is None else self.bias.data_ptr(), self.w.shape[0], self.w.shape[1])


def _fused(members: Sequence[Int8Linear], what: str) -> _Linear:
    """The shared-input group of `members` (`haq.kernels.shared_input`), in their order."""
    group = members[0].shared[0] if members[0].shared is not None else None
    if group is None or [m.shared for m in members] != [(group, i) for i in range(len(members))] \
            or len(group.sizes) != len(members):
        raise Unsupported(f"{what} are not fused into one int8 GEMM (load the checkpoint with fuse=True)")
    return _Linear(group.qweight, group.w_scale, group.bias)


class _FloatLinear:
    """A float32 [N, K] weight (and bias) as the step's `wf` reads it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.w, self.bias = weight, bias

    def struct(self) -> cpu.QLinear:
        return cpu.QLinear(None, None, None, None if self.bias is None else self.bias.data_ptr(), self.w.shape[0],
                           self.w.shape[1], self.w.data_ptr())


def _float_linear(m: nn.Module, what: str) -> nn.Linear:
    if type(m) is not nn.Linear:
        raise Unsupported(f"{what} is {type(m).__name__}, not a float nn.Linear")
    _contiguous_f32(m.weight, what)
    return m


def _still_views(fused: _FloatLinear, linears: Sequence[nn.Linear]) -> bool:
    """Whether each module's weight (and bias) is still its rows of `fused` (a decoder built before)."""
    start, size = 0, fused.w.element_size()
    for m in linears:
        rows = m.out_features
        if m.weight.data_ptr() != fused.w.data_ptr() + start * fused.w.stride(0) * size or \
                tuple(m.weight.shape) != (rows, fused.w.shape[1]) or not m.weight.is_contiguous():
            return False
        if m.bias is not None and (fused.bias is None or m.bias.data_ptr() != fused.bias.data_ptr() + start * size):
            return False
        start += rows
    return start == fused.w.shape[0]


def _fused_float(members: Sequence[nn.Module], what: str) -> _FloatLinear:
    """One float32 weight for `members` (rows in their order); each module's weight (and bias)
    becomes a view of it, so the model holds one copy. A later decoder finds it on the first
    member and reuses it while the modules still view it."""
    linears = [_float_linear(m, f"{what} {i}") for i, m in enumerate(members)]
    held = linears[0].__dict__.get("_haq_fused")
    if held is not None and _still_views(held, linears):
        return held
    weight = torch.cat([m.weight.detach() for m in linears]).contiguous()
    with_bias = [m.bias is not None for m in linears]
    bias = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                      for m in linears]).contiguous() if any(with_bias) else None
    start = 0
    for m, has_bias in zip(linears, with_bias):
        rows = slice(start, start + m.out_features)
        m.weight.data = weight[rows]
        if has_bias:
            m.bias.data = bias[rows]
        start += m.out_features
    linears[0]._haq_fused = _FloatLinear(weight, bias)
    return linears[0]._haq_fused


class NativeDecoder:
    """The model's weights as the kernel reads them (pointers into the model's own tensors, plus
    row sums), built once; `step` runs one decode step."""

    def __init__(self, model: nn.Module, experts: Sequence[GroupedExperts] | None = None) -> None:
        lib = cpu.library()
        if lib is None:
            raise Unsupported(f"haq's CPU kernels are unavailable: {cpu.unavailable_reason()}")
        config = model.config
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not isinstance(getattr(model, "lm_head", None), (nn.Linear, Int8Linear)):
            raise Unsupported(f"{type(model).__name__} is not a llama-layout causal LM")
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise Unsupported("sliding-window attention")
        other = next((type(layer).__name__ for layer in layers if type(layer).__name__ not in DECODER_LAYERS), None)
        if other is not None:
            raise Unsupported(f"decoder layer {other}")
        self.model = model
        self.hidden, self.vocab = config.hidden_size, model.lm_head.out_features
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.top_k = getattr(config, "num_experts_per_tok", 0) or 0
        self.experts = getattr(config, "num_local_experts", 0) or 0
        first = layers[0].self_attn
        self.head_dim, self.scaling = first.head_dim, float(first.scaling)
        if self.head_dim > MAX_HEAD_DIM or self.experts > MAX_EXPERTS or self.top_k > MAX_TOP_K:
            raise Unsupported("head dim, experts or top-k beyond the kernel's buffers")
        self.eps = None
        self.float = type(first.q_proj) is nn.Linear  # an unquantized model: every linear float32
        self.qmax = 0 if self.float else None
        self._held: list = []
        self.layers = (cpu.Layer * len(layers))()
        self.max_inter = 0
        moe = 0
        for index, layer in enumerate(layers):
            spec = self.layers[index]
            spec.attn_norm = self._norm(layer.input_layernorm, f"layer {index} input_layernorm")
            spec.mlp_norm = self._norm(layer.post_attention_layernorm, f"layer {index} post_attention_layernorm")
            attn = layer.self_attn
            if getattr(attn.o_proj, "bias", None) is not None:
                raise Unsupported("o_proj has a bias")
            if self.float:
                spec.qkv = self._hold(_fused_float([attn.q_proj, attn.k_proj, attn.v_proj],
                                                   f"layer {index} q/k/v")).struct()
                spec.o = self._hold(_FloatLinear(_float_linear(attn.o_proj, f"layer {index} o_proj").weight.detach()
                                                 .contiguous(), None)).struct()
            else:
                qkv = [_plain_int8(getattr(attn, n), f"layer {index} {n}") for n in ("q_proj", "k_proj", "v_proj")]
                self._qmax(qkv[0])
                spec.qkv = self._hold(_fused(qkv, f"layer {index} q/k/v")).struct()
                o = _plain_int8(attn.o_proj, f"layer {index} o_proj")
                spec.o = self._hold(_Linear(o.qweight, o.w_scale, None)).struct()
            mlp = layer.mlp
            if hasattr(mlp, "gate") and hasattr(mlp, "experts"):
                grouped = experts[moe] if experts is not None else self._grouped(mlp.experts, index)
                if grouped.qmax != self.qmax:
                    raise Unsupported(f"layer {index} experts and linears differ in precision (activation "
                                      f"levels {grouped.qmax} vs {self.qmax}; 0: float32)")
                moe += 1
                router = self._hold(_contiguous_f32(mlp.gate.weight, f"layer {index} router"))
                if getattr(mlp.gate, "bias", None) is not None or router.shape != (self.experts, self.hidden):
                    raise Unsupported(f"layer {index} router is not a bias-free [experts, hidden] linear")
                spec.router = router.data_ptr()
            else:
                grouped = self._dense_mlp(mlp, index)
                spec.router = None
            self._hold(grouped)
            table = self._hold(np.concatenate(grouped.tables).astype(np.int64))
            spec.tables = table.ctypes.data
            spec.inter = grouped.intermediate
            spec.down_rot = grouped.rotation
            self.max_inter = max(self.max_inter, grouped.intermediate)
        if experts is not None and moe != len(experts):
            raise Unsupported(f"{len(experts)} expert groups given for {moe} MoE layers")
        self.final_norm = self._norm(inner.norm, "model.norm")
        head = model.lm_head
        if isinstance(head, Int8Linear) and self.float:
            raise Unsupported("an int8 lm_head on a float model")
        if isinstance(head, Int8Linear):  # quantize_lm_head
            self._qmax(_plain_int8(head, "the lm_head"))
            self.lm_head, self.lm_head_q = None, self._hold(_Linear(head.qweight, head.w_scale, head.bias)).struct()
        else:
            if getattr(head, "bias", None) is not None:
                raise Unsupported("the lm_head has a bias")
            self.lm_head, self.lm_head_q = self._hold(_contiguous_f32(head.weight, "the lm_head")), cpu.QLinear()
        self.num_layers = len(layers)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._struct: tuple[cpu.Step, int] | None = None

    # -- building ---------------------------------------------------------------------------
    def _hold(self, obj):
        self._held.append(obj)  # the kernel reads these tensors' memory
        return obj

    def _norm(self, norm: nn.Module, what: str) -> int:
        if type(norm).__name__ not in NORMS or getattr(norm, "weight", None) is None:
            raise Unsupported(f"{what} is {type(norm).__name__}, not a plain RMSNorm")
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))
        if self.eps is not None and eps != self.eps:
            raise Unsupported("norms with different epsilons")
        self.eps = eps
        return self._hold(_contiguous_f32(norm.weight, what)).data_ptr()

    def _qmax(self, linear: Int8Linear) -> None:
        qmax = qmax_for(linear.act_bits)
        if self.qmax is not None and qmax != self.qmax:
            raise Unsupported("linears with different activation bits")
        self.qmax = qmax

    def _dense_mlp(self, mlp: nn.Module, index: int) -> GroupedExperts:
        """A dense gated MLP as one expert that every row takes."""
        attrs = ("gate_proj", "up_proj", "down_proj")
        members, names = [getattr(mlp, a, None) for a in attrs], [f"layer {index} mlp.{a}" for a in attrs]
        if not is_silu(getattr(mlp, "act_fn", None)) or any(getattr(m, "bias", None) is not None for m in members):
            raise Unsupported(f"layer {index} MLP is not a bias-free SiLU gated MLP")
        if self.float:
            fused = _fused_float(members[:2], f"layer {index} gate/up")
            down = _float_linear(members[2], names[2]).weight.detach().contiguous()
            return GroupedExperts([fused.w], None, [down], None)
        gate_up = [_plain_int8(m, n) for m, n in zip(members[:2], names)]
        down = _plain_int8(members[2], names[2], rotated=True)
        fused = _fused(gate_up, f"layer {index} gate/up")
        return GroupedExperts([fused.w], [fused.scale], [down.qweight], [down.w_scale],
                              down_rotation=down.online_rotation)

    def _grouped(self, experts: nn.Module, index: int) -> GroupedExperts:
        if self.float:
            gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
            if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or \
                    not GroupedExperts.supports_float(getattr(experts, "act_fn", None), gate_up, down) or \
                    getattr(experts, "has_bias", False):
                raise Unsupported(f"layer {index} experts are not float32 SiLU experts (gate_up_proj, down_proj)")
            E, H = gate_up.shape[0], self.hidden
            if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[2] != H or down.shape[:2] != (E, H) \
                    or gate_up.shape[1] != 2 * down.shape[2]:
                raise Unsupported(f"layer {index} experts are not laid out as gate_up [E, 2I, H], down [E, H, I]")
            return GroupedExperts(list(gate_up.detach()), None, list(down.detach()), None)
        if not isinstance(experts, Int8Experts):
            raise Unsupported(f"layer {index} experts are {type(experts).__name__}, not haq's Int8Experts")
        if not GroupedExperts.supports(experts.act_fn, experts.act_bits, experts.act_mode,
                                       experts.gate_up_in_scale is not None, experts.gate_up_q.device):
            raise Unsupported(f"layer {index} experts are not SiLU W8A8 per-token experts on the CPU")
        if qmax_for(experts.act_bits) != self.qmax:
            raise Unsupported("experts and linears with different activation bits")
        return GroupedExperts.of_int8_experts(experts)

    @classmethod
    def build(cls, model: nn.Module, experts: Sequence[GroupedExperts] | None = None
              ) -> tuple[NativeDecoder | None, str]:
        """(the decoder, "") or (None, why the model runs the module path)."""
        try:
            return cls(model, experts), ""
        except Unsupported as e:
            return None, str(e)

    # -- a step -----------------------------------------------------------------------------
    def _rotary(self, x: torch.Tensor, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, head_dim] at `positions`, rows of a table the model's rotary module
        computes once for positions 0..n-1 (grown by doubling): each entry is one product and
        one cos/sin, so a row equals the module's output at that position alone."""
        if getattr(self.model.model.rotary_emb, "rope_type", "default") in DYNAMIC_ROPE:
            position_ids = torch.tensor(positions, dtype=torch.long)[:, None]
            return tuple(t.float().reshape(len(positions), self.head_dim).contiguous()
                         for t in self.model.model.rotary_emb(x[:, None], position_ids))
        top = max(positions) + 1
        if self._rope is None or self._rope[0].shape[0] < top:
            n = max(2 * top, 256)
            cos, sin = self.model.model.rotary_emb(x[:1, None], torch.arange(n)[None])
            self._rope = (cos[0].float().contiguous(), sin[0].float().contiguous())
        index = torch.tensor(positions, dtype=torch.long)
        return self._rope[0][index], self._rope[1][index]

    def _step_struct(self, B: int) -> tuple[cpu.Step, int]:
        """The step's fixed fields for B rows and its scratch bytes, built once per B (a step sets
        its length, pads, rotary rows and threads)."""
        if self._struct is None or self._struct[0].B != B:
            st = cpu.Step(layers=self.num_layers, B=B, H=self.hidden, heads=self.heads, kv_heads=self.kv_heads,
                          head_dim=self.head_dim, experts=self.experts, top_k=self.top_k, vocab=self.vocab,
                          final_norm=self.final_norm, lm_head=None if self.lm_head is None else self.lm_head.data_ptr(),
                          lm_head_q=self.lm_head_q, eps=self.eps, attn_scale=self.scaling, qmax=self.qmax)
            self._struct = (st, cpu.library().haq_decode_scratch(st, self.max_inter))
        return self._struct

    def accepts(self, cache) -> bool:
        """A cache this step can extend: every layer preallocated, float32, holding tokens."""
        layers = getattr(cache, "layers", ())
        return len(layers) == self.num_layers and all(
            isinstance(layer, PreallocatedLayer) and layer.holds(torch.float32, "cpu") for layer in layers)

    @torch.no_grad()
    def step(self, tokens: Sequence[int], positions: Sequence[int], pads: Sequence[int], cache,
             threads: int | None = None, seconds: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """One new token per row (row b at position positions[b], after pads[b] masked columns of
        the shared cache): logits [B, vocab] and the routing [layers, B, top_k] (int16; rows of
        dense layers are -1). `seconds`: float64 [len(STEP_PARTS) + 1], each part's time added."""
        B = len(tokens)
        ids = torch.tensor(tokens, dtype=torch.long)[:, None]
        x = self.model.model.embed_tokens(ids).reshape(B, self.hidden).float().contiguous()
        cos, sin = self._rotary(x, positions)
        buffers = [layer.reserve(1) for layer in cache.layers]
        length = buffers[0][2]
        for spec, (kbuf, vbuf, n) in zip(self.layers, buffers):
            if n != length or kbuf.shape[0] != B:
                raise ValueError(f"cache layers disagree: length {n} vs {length}, rows {kbuf.shape[0]} vs {B}")
            spec.kbuf, spec.vbuf, spec.cap = kbuf.data_ptr(), vbuf.data_ptr(), kbuf.shape[-2]
        pad = torch.tensor(list(pads), dtype=torch.int64)
        st, scratch_bytes = self._step_struct(B)
        st.length, st.pads, st.cos, st.sin = length, pad.data_ptr(), cos.data_ptr(), sin.data_ptr()
        st.threads = threads or torch.get_num_threads()
        lib = cpu.library()
        work = cpu.scratch(scratch_bytes)
        logits = torch.empty(B, self.vocab, dtype=torch.float32)
        routing = np.full((self.num_layers, B, max(self.top_k, 1)), -1, dtype=np.int16)
        if seconds is not None and (seconds.dtype != np.float64 or seconds.shape != (len(STEP_PARTS) + 1,)):
            raise ValueError(f"seconds must be float64 [{len(STEP_PARTS) + 1}]")
        lib.haq_decode_step(st, self.layers, x.data_ptr(), logits.data_ptr(), routing.ctypes.data, work.data_ptr(),
                            None if seconds is None else seconds.ctypes.data)
        for layer in cache.layers:
            layer.advance(1)
        return logits, routing
