"""Layer-by-layer post-training quantization.

Each decoder layer is calibrated on the outputs of the already-quantized layers before it: one
pass of the float layer over the calibration inputs records activation ranges, Hessians and token
samples; smoothing (fixed or adaptive alpha) is folded in; every linear and expert is quantized
(GPTQ or RTN) into real int8 modules; the quantized layer then produces the next layer's inputs.
Peak memory is the model plus one layer's calibration inputs and statistics, or, with a
`LayerSource` (offloaded), one layer instead of the model. With `work_dir`, every finished layer
is saved and an interrupted run resumes after the last one. With a `device` (CUDA), the calibration
inputs live there and each layer goes there to be calibrated and quantized, and back to the host.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from haq.errors import HaqError
from haq.io import atomic_write_text, atomic_write_with, write_failure
from haq.kernels.experts import Int8Experts
from haq.kernels.int8 import Int8Linear
from haq.kernels.weight_only import WeightOnlyInt8Linear
from haq.models.adapters import ArchAdapter, LayerSpec, adapter_for
from haq.quant.calibration import LayerStats, forward_windows, observe_layer
from haq.quant.observers import shrunk_hessian
from haq.quant.gptq import gptq_quantize
from haq.kernels.specs import install_specs, spec_of
from haq.quant.recipe import Recipe
from haq.quant.report import LayerReport, QuantReport
from haq.quant.rotation import rotate_ends, rotate_layer
from haq.kernels.grid import dequantize_weight, qmax_for, quantize_weight, weight_scales
from haq.quant.fake_quant import Probe, block_error
from haq.quant.smooth_layer import smooth_layer

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


class _LayerInputs(nn.Module):
    """Stands in for decoder layer `index` during capture: records the keyword arguments the model
    passes it (masks and rotary embeddings can differ per layer type, e.g. Gemma3's sliding and
    global layers) and, for the first layer, its input; the last one stops the forward."""

    def __init__(self, index: int, last: bool, captured: dict):
        super().__init__()
        self.index, self.last, self.captured = index, last, captured

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.captured["x"] = hidden_states
        self.captured["kwargs"][self.index] = kwargs
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ArchAdapter, calib: torch.Tensor):
    """Inputs of the first decoder layer for every calibration row, and per layer the keyword
    arguments the model passes it (identical for equal-length rows). Only the embeddings and the
    model's mask and rotary set-up run: every layer is a recorder while capturing."""
    layers = adapter.decoder_layers(model)
    captured: dict = {"kwargs": {}}
    originals = list(layers)
    for index in range(len(layers)):
        layers[index] = _LayerInputs(index, index == len(layers) - 1, captured)
    inputs = []
    try:
        for row in calib:
            try:
                model(row[None], use_cache=False)
            except _StopForward:
                pass
            inputs.append(captured["x"])
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return inputs, [captured["kwargs"][i] for i in range(len(layers))]


def to_device(value, device: torch.device):
    """Tensors, also inside the tuples, lists and dicts a layer's keyword arguments hold, on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, index: int) -> list[torch.Tensor]:
    outputs = forward_windows(layer, inputs, kwargs)
    if not all(bool(torch.isfinite(out).all()) for out in outputs):
        raise HaqError(f"NaN or Inf in the outputs of decoder layer {index} during calibration")
    return outputs


def _solve(W: torch.Tensor, H: torch.Tensor | None, tokens: int, recipe: Recipe, name: str,
           report: LayerReport, min_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8, scale) by GPTQ, or by RTN when the recipe says so or GPTQ cannot run."""
    if recipe.uses_gptq and H is not None and tokens >= min_tokens:
        result = gptq_quantize(W.float(), H, bits=recipe.wbits, blocksize=recipe.blocksize,
                               percdamp=recipe.percdamp, actorder=recipe.actorder)
        report.damp[name] = result.damp
        if result.fallback:
            log.warning("GPTQ: no damping made the Hessian of %s factorizable; used RTN", name)
            report.fallbacks.append(name)
        return result.qweight, result.scale
    if recipe.uses_gptq:
        log.warning("%s saw %d calibration tokens (< %d): quantized with RTN instead of GPTQ",
                    name, tokens, min_tokens)
        report.fallbacks.append(name)
    return _rtn(W, recipe.wbits)


def _rtn(W: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight_scales(W.float(), bits)
    return quantize_weight(W.float(), scale, bits), scale


def _static_scale(act_max: torch.Tensor | None, recipe: Recipe) -> torch.Tensor | None:
    if recipe.act != "per-tensor" or not recipe.quant_acts:
        return None
    peak = 0.0 if act_max is None else float(act_max.max())
    return torch.tensor(max(peak, 1e-8) / qmax_for(recipe.abits))


def _quantized_linear(linear: nn.Linear, qweight, scale, recipe: Recipe, input_scale) -> nn.Module:
    if not recipe.quant_acts:
        module = WeightOnlyInt8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        module.qweight.copy_(qweight)
        module.w_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module
    module = Int8Linear.from_float(linear, bits=recipe.wbits, scale=scale, qweight=qweight,
                                   act_bits=recipe.abits, act_mode=recipe.act, input_scale=input_scale)
    module.online_rotation = getattr(linear, "online_rotation", None)
    return module


LM_HEAD = "lm_head"  # every causal LM family haq knows names it so


def _quantize_lm_head(model: nn.Module, recipe: Recipe) -> dict[str, dict]:
    """The lm_head, RTN per output channel with dynamic per-token activations (its input, the final
    norm's output, is not smoothed). It is a decode token's largest single weight read (a third of
    smollm2-8x135m's in fp32). Replacing the module unties a tied lm_head; the embedding stays float."""
    head = model.get_submodule(LM_HEAD)
    qweight, scale = _rtn(head.weight.detach().float(), recipe.wbits)
    module = _quantized_linear(head, qweight, scale, replace(recipe, act="per-token"), None)
    model.set_submodule(LM_HEAD, module)
    return {LM_HEAD: spec_of(module)}


Solution = tuple[torch.Tensor, torch.Tensor]  # (qweight int8, scale)


def quantize_layer(layer: nn.Module, spec: LayerSpec, stats: LayerStats, recipe: Recipe,
                   report: LayerReport, prefix: str, probe: Probe | None = None) -> dict[str, dict]:
    """Smooth, then quantize every linear and expert of one layer in place; returns the specs."""
    if recipe.smooths:
        report.alphas = smooth_layer(layer, spec, stats, recipe, probe)
        log.debug("layer %d alphas %s", report.index, report.alphas)
    linears = _solve_linears(layer, spec, stats, recipe, report, prefix)
    experts = _solve_experts(layer, spec, stats, recipe, report, prefix) if spec.moe is not None else None
    if recipe.method == "haq" and probe is not None:
        report.weights = "gptq"
        rtn_linears, rtn_experts = _rtn_solutions(layer, spec, recipe)
        if (_block_error_with(layer, spec, recipe, probe, rtn_linears, rtn_experts)
                < _block_error_with(layer, spec, recipe, probe, linears, experts)):
            linears, experts, report.weights = rtn_linears, rtn_experts, "rtn"
    specs = {}
    for name, (qweight, scale) in linears.items():
        linear = layer.get_submodule(name)
        layer.set_submodule(name, _quantized_linear(linear, qweight, scale, recipe,
                                                    _static_scale(stats.linears[name].act_max, recipe)))
        specs[name] = spec_of(layer.get_submodule(name))
    if experts is not None:
        specs[spec.moe.experts] = _install_experts(layer, spec, stats, recipe, experts)
    return specs


def _solve_linears(layer: nn.Module, spec: LayerSpec, stats: LayerStats, recipe: Recipe, report: LayerReport,
                   prefix: str) -> dict[str, Solution]:
    """One solve per distinct input: linears sharing a statistic (q/k/v, gate/up) are stacked by rows
    and solved together, which is exactly the separate solves (GPTQ treats rows independently under
    one H, and each row keeps its own scale), with one factorization and one column loop."""
    readers: dict[int, list[str]] = {}
    for name in spec.linears:
        readers.setdefault(id(stats.linears[name]), []).append(name)
    solutions: dict[str, Solution] = {}
    for names in readers.values():
        st = stats.linears[names[0]]
        weights = [layer.get_submodule(name).weight.data for name in names]
        label = ",".join(f"{prefix}.{name}" for name in names)
        qweight, scale = _solve(torch.cat(weights), st.H, st.tokens, recipe, label, report)
        st.H = None  # solved: a Hessian is the largest statistic, and nothing reads it again
        rows = [w.shape[0] for w in weights]
        for name, q, sc in zip(names, qweight.split(rows), scale.split(rows)):
            solutions[name] = (q.contiguous(), sc.contiguous())
    return solutions


def _rtn_solutions(layer: nn.Module, spec: LayerSpec, recipe: Recipe):
    bits = recipe.wbits
    linears = {name: _rtn(layer.get_submodule(name).weight.data, bits) for name in spec.linears}
    if spec.moe is None:
        return linears, None
    ex = layer.get_submodule(spec.moe.experts)
    return linears, [(_rtn(ex.gate_up_proj.data[e], bits), _rtn(ex.down_proj.data[e], bits))
                     for e in range(ex.gate_up_proj.shape[0])]


@torch.no_grad()
def _block_error_with(layer: nn.Module, spec: LayerSpec, recipe: Recipe, probe: Probe,
                      linears: dict[str, Solution], experts: list[tuple[Solution, Solution]] | None) -> float:
    """The block error of the layer with these quantized weights (activations fake-quantized)."""
    saved = {name: layer.get_submodule(name).weight.data for name in linears}
    for name, (q, scale) in linears.items():
        layer.get_submodule(name).weight.data = dequantize_weight(q, scale, saved[name].dtype)
    dtype = layer.get_submodule(spec.moe.experts).gate_up_proj.dtype if experts is not None else None
    dequantized = None if experts is None else (  # one expert at a time, as it runs
        lambda e: (dequantize_weight(*experts[e][0], dtype), dequantize_weight(*experts[e][1], dtype)))
    try:
        return block_error(layer, spec, recipe, probe, quantize_weights=False, expert_weights=dequantized)
    finally:
        for name, weight in saved.items():
            layer.get_submodule(name).weight.data = weight


def _solve_experts(layer, spec: LayerSpec, stats, recipe, report, prefix) -> list[tuple[Solution, Solution]]:
    experts = layer.get_submodule(spec.moe.experts)
    ex = stats.experts
    solutions = []
    inter, hidden = experts.down_proj.shape[2], experts.down_proj.shape[1]
    routed_gate_up = None if recipe.calibrate_all_experts else shrunk_hessian(ex.gate_up, recipe.expert_shrink * hidden)
    down_hessian = shrunk_hessian(ex.down, 0 if recipe.calibrate_all_experts else recipe.expert_shrink * inter)
    for e in range(experts.gate_up_proj.shape[0]):
        name = f"{prefix}.{spec.moe.experts}[{e}]"
        if ex.routed_tokens[e] < recipe.min_expert_tokens and not recipe.calibrate_all_experts:
            log.warning("%s was routed %d calibration tokens (< %d): its weights use RTN",
                        name, ex.routed_tokens[e], recipe.min_expert_tokens)
        H, tokens = ex.gate_up_hessian(e)
        if routed_gate_up is not None:
            H = routed_gate_up(e)
        gate_up = _solve(experts.gate_up_proj.data[e], H, tokens, recipe, f"{name}.gate_up", report,
                         recipe.min_expert_tokens)
        down = _solve(experts.down_proj.data[e], down_hessian(e), ex.down[e].tokens, recipe, f"{name}.down",
                      report, recipe.min_expert_tokens)
        ex.gate_up[e].H = ex.down[e].H = None  # solved (any shrink pool was made before the loop)
        solutions.append((gate_up, down))
    return solutions


def _install_experts(layer, spec: LayerSpec, stats, recipe, solutions: list[tuple[Solution, Solution]]) -> dict:
    experts = layer.get_submodule(spec.moe.experts)
    ex = stats.experts
    E, two_i, hidden = experts.gate_up_proj.shape
    module = Int8Experts(E, hidden, two_i // 2, experts.act_fn,
                         act_bits=recipe.abits if recipe.quant_acts else 16, act_mode=recipe.act)
    module.down_rotation = getattr(experts, "down_rotation", None)
    for e, ((gu_q, gu_s), (d_q, d_s)) in enumerate(solutions):
        module.gate_up_q[e], module.gate_up_scale[e] = gu_q, gu_s
        module.down_q[e], module.down_scale[e] = d_q, d_s
        if module.gate_up_in_scale is not None:
            gate_up_max = ex.moe_input.act_max if recipe.calibrate_all_experts else ex.gate_up[e].act_max
            module.gate_up_in_scale[e] = _static_scale(gate_up_max, recipe)
            module.down_in_scale[e] = _static_scale(ex.down[e].act_max, recipe)
    layer.set_submodule(spec.moe.experts, module)
    return spec_of(module)


def partial_paths(work_dir: Path, index: int) -> tuple[Path, Path]:
    return work_dir / f"layer_{index:03d}.safetensors", work_dir / f"layer_{index:03d}.json"


def _save_partial(work_dir: Path, index: int, layer: nn.Module, specs: dict, report: LayerReport) -> None:
    from haq.tensorfile import write_safetensors

    tensors, meta = partial_paths(work_dir, index)
    state = {k: v.contiguous() for k, v in layer.state_dict().items()}
    atomic_write_with(tensors, lambda handle: write_safetensors(handle, state))
    # The JSON goes last: a layer counts as done only when both files exist.
    atomic_write_text(meta, json.dumps({"specs": specs, "report": report.__dict__}))


def _load_partial(work_dir: Path, index: int, layer: nn.Module) -> tuple[dict, LayerReport] | None:
    from safetensors.torch import load_file

    tensors, meta = partial_paths(work_dir, index)
    if not (tensors.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        state = load_file(tensors)
        install_specs(layer, info["specs"])
        layer.load_state_dict(state)
    except Exception as exc:  # a half-written layer from a crash: redo it
        log.warning("ignoring unreadable resume state for layer %d (%s)", index, exc)
        return None
    return info["specs"], LayerReport(**info["report"])


def rotates(recipe: Recipe, adapter: ArchAdapter) -> bool:
    """Whether `recipe` rotates this architecture's residual stream (on: it must; auto: haq, where it can)."""
    if recipe.rotate == "auto":
        return recipe.method == "haq" and adapter.residual is not None
    return recipe.rotate == "on"


class LayerSource(Protocol):
    """Decoder layers brought into memory one at a time (`haq.checkpoint.layer_source`)."""

    def load(self, index: int) -> nn.Module: ...

    def release(self, index: int) -> None: ...


def quantize_model(model: nn.Module, recipe: Recipe, calib: torch.Tensor, work_dir: Path | None = None,
                   progress: bool = True, source: LayerSource | None = None,
                   device: str | torch.device = "cpu") -> QuantReport:
    """Quantize `model` in place with `recipe` on calibration token windows `calib` [n, seqlen].
    With `source`, the decoder layers are not in memory: each is loaded, quantized, saved into
    `work_dir` and released, so memory holds one layer (the checkpoint is then assembled from
    `work_dir`). `device`: where each layer is calibrated and quantized (the model stays on the
    host: a layer goes there and comes back; the calibration inputs stay there)."""
    device = torch.device(device)
    start = time.perf_counter()
    adapter = adapter_for(model.config)
    if recipe.method == "fp":
        return QuantReport(recipe.to_dict(), [], {}, 0.0, 0)
    if calib.ndim != 2 or calib.shape[0] < 1 or calib.shape[1] < 2:
        raise HaqError(f"calibration needs at least one window of >= 2 tokens, got shape {tuple(calib.shape)}")
    tokens = calib.numel()
    if source is not None and work_dir is None:
        raise HaqError("internal: offloaded quantization needs a work folder for its finished layers")
    adapter.check_norms(model, layers=source is None)
    # Rotations are seeded, so a resumed run rotates the same way; each layer turns as it is reached
    # (an offloaded one as it loads), a resumed one comes back from disk already turned.
    Q = rotate_ends(model) if rotates(recipe, adapter) else None
    Q = None if Q is None else Q.to(device)  # once: each layer rotates where it runs
    probe_windows = max(1, math.ceil(recipe.search_tokens / calib.shape[1]))  # haq's block-error probe
    if work_dir is not None:
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only place or a full disk: a clear error, like every other write
            raise write_failure(work_dir, exc) from None
    inputs, layer_kwargs = capture_layer_inputs(model, adapter, calib)
    inputs, layer_kwargs = to_device(inputs, device), to_device(layer_kwargs, device)
    layers = adapter.decoder_layers(model)
    reports, specs = [], {}
    bar = tqdm(range(len(layers)), desc=f"quantize {recipe.method}", disable=not progress)
    for index in bar:
        if source is not None:
            source.load(index)
            adapter.check_layer_norms(model.config, index, layers[index])
        layer, prefix = layers[index], f"{adapter.layers}.{index}"
        spec, kwargs = adapter.layer_spec(model.config, index), layer_kwargs[index]
        layer_start = time.perf_counter()
        resumed = _load_partial(work_dir, index, layer) if work_dir is not None else None
        if resumed is not None:
            layer_specs, report = resumed
            layer.to(device)
        else:
            layer.to(device)  # first: the rotation's float64 products run where the layer runs
            if Q is not None:
                rotate_layer(model.config, index, layer, Q, online=recipe.quant_acts,
                             hadamard_only=recipe.rotate == "auto")
            report = LayerReport(index)
            with observe_layer(layer, spec, recipe.calibrate_all_experts, recipe.uses_gptq) as stats:
                outputs = run_layer(layer, inputs, kwargs, index)
            probe = Probe(inputs[:probe_windows], kwargs, outputs[:probe_windows])
            layer_specs = quantize_layer(layer, spec, stats, recipe, report, prefix, probe)
            layer.to(device)  # modules quantize_layer builds on the host (fused experts, weight-only linears)
            del stats, probe, outputs
            report.seconds = time.perf_counter() - layer_start
        specs.update({f"{prefix}.{k}": v for k, v in layer_specs.items()})
        reports.append(report)
        inputs = run_layer(layer, inputs, kwargs, index)
        layer.to("cpu")
        if resumed is None and work_dir is not None:
            _save_partial(work_dir, index, layer, layer_specs, report)
        bar.set_postfix_str(f"layer {index} {report.seconds:.1f}s")
        if source is not None:
            del layer  # the last reference here: its memory goes before the next layer loads
            source.release(index)
    if recipe.quantize_lm_head:
        specs.update(_quantize_lm_head(model, recipe))
    return QuantReport(recipe.to_dict(), reports, specs, time.perf_counter() - start, tokens, rotated=Q is not None)
