"""End-to-end quantization on the tiny configs of every supported architecture."""
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from haq.errors import HaqError
from haq.kernels.experts import Int8Experts
from haq.kernels.int8 import Int8Linear
from haq.models.adapters import adapter_for
from haq.quant import pipeline
from haq.quant.calibration import observe_layer
from haq.quant.pipeline import capture_layer_inputs, quantize_model, run_layer
from haq.quant.recipe import Recipe
from haq.kernels.grid import dequantize_weight, fake_quant_act
from haq.quant.fake_quant import Probe, block_error
from haq.quant.smooth_layer import smooth_layer

ARCHS = ["tiny-llama", "tiny-mixtral-random", "tiny-opt", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-deepseek-v2",
         "tiny-deepseek-v3", "tiny-gemma3"]


def load(tiny_dir, name):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir(name)).eval()


def tokens(n, length, seed):
    return torch.randint(0, 4096, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("method", ["smoothquant", "haq"])
def test_smoothing_leaves_the_float_layer_unchanged(tiny_dir, name, method):
    """Every layer (dense and MoE ones where a family has both), each with its own keyword arguments."""
    model = load(tiny_dir, name)
    adapter = adapter_for(model.config)
    inputs, layer_kwargs = capture_layer_inputs(model, adapter, tokens(2, 32, 0))
    recipe = Recipe(method=method, alpha=0.8, alpha_step=0.25)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        spec, kwargs = adapter.layer_spec(model.config, index), layer_kwargs[index]
        with observe_layer(layer, spec, False) as stats:
            before = run_layer(layer, inputs, kwargs, index)
        probe = Probe(inputs[:1], kwargs, before[:1])
        unsmoothed_error = block_error(layer, spec, recipe, probe)
        alphas = smooth_layer(layer, spec, stats, recipe, probe)
        after = run_layer(layer, inputs, kwargs, index)
        assert set(alphas) == {g.name for g in spec.groups}
        if method == "smoothquant":
            assert all(a == 0.8 for a in alphas.values() if a is not None)
        else:  # "no smoothing" is a candidate of every group, so the search never makes the block worse
            assert block_error(layer, spec, recipe, probe) <= unsmoothed_error * (1 + 1e-6)
        for b, a in zip(before, after):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        inputs = after


@pytest.mark.parametrize("name", ARCHS)
def test_captured_layer_inputs_replay_the_models_own_forward(tiny_dir, name):
    """Each layer gets the keyword arguments the model gives it (Gemma3: its sliding or global mask
    and rotary embedding; windows longer than the sliding window tell them apart)."""
    model = load(tiny_dir, name)
    adapter = adapter_for(model.config)
    ids = tokens(2, 40, 0)
    inputs, layer_kwargs = capture_layer_inputs(model, adapter, ids)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, then after each layer
        for index, layer in enumerate(adapter.decoder_layers(model)[:-1]):  # the last output is normed
            inputs = run_layer(layer, inputs, layer_kwargs[index], index)
            torch.testing.assert_close(torch.cat(inputs), hidden[index + 1], rtol=1e-5, atol=1e-5)


class FakeQuantLinear(nn.Module):
    """Reference for Int8Linear: dequantized weights, fake-quant activations, float matmul."""

    def __init__(self, q: Int8Linear):
        super().__init__()
        self.q = q

    def forward(self, x):
        q = self.q
        w = dequantize_weight(q.qweight, q.w_scale)
        if q.online_rotation is not None:  # --rotate (the default for haq): x R, then quantized
            x = q.online_rotation(x)
        x = fake_quant_act(x, q.act_bits, q.act_mode, q.input_scale)
        return F.linear(x, w, q.bias)


def fake_quant_expert(module: Int8Experts, e: int, x):
    scale_in = module.gate_up_in_scale
    g_u = F.linear(fake_quant_act(x, module.act_bits, module.act_mode, None if scale_in is None else scale_in[e]),
                   dequantize_weight(module.gate_up_q[e], module.gate_up_scale[e]))
    gate, up = g_u.chunk(2, -1)
    h = module.act_fn(gate) * up
    if module.down_rotation is not None:
        h = module.down_rotation(h)
    scale_in = module.down_in_scale
    return F.linear(fake_quant_act(h, module.act_bits, module.act_mode, None if scale_in is None else scale_in[e]),
                    dequantize_weight(module.down_q[e], module.down_scale[e]))


def to_fake_quant(model):
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Linear):
            model.set_submodule(name, FakeQuantLinear(module))
        elif isinstance(module, Int8Experts):
            module.expert_forward = lambda e, x, m=module: fake_quant_expert(m, e, x)
    return model


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("act", ["per-token", "per-tensor"])
def test_int8_model_matches_its_fake_quant_reference(tiny_dir, name, act):
    import copy

    model = load(tiny_dir, name)
    quantize_model(model, Recipe(method="haq", act=act, alpha_step=0.25), tokens(4, 32, 0), progress=False)
    kinds = {type(m) for m in model.modules()}
    assert Int8Linear in kinds and not any(isinstance(m, nn.Linear) and "proj" in n and "gate" not in n
                                           for n, m in model.named_modules() if "layers" in n)
    reference = to_fake_quant(copy.deepcopy(model))
    ids = tokens(2, 24, 1)
    with torch.no_grad():
        real, fake = model(ids).logits, reference(ids).logits
    # The same integers up to float rounding: an activation exactly between two levels may round
    # differently in the two op orders, which moves a few logits by ~1e-3 (more where it flips an MoE
    # routing, which also moves the mean); the typical logit agrees to float rounding.
    torch.testing.assert_close(real, fake, rtol=1e-3, atol=5e-3)
    assert (real - fake).abs().median() < 1e-5


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "gptq", "haq"])
def test_methods_stay_close_to_float(tiny_dir, method):
    model = load(tiny_dir, "tiny-llama")
    ids = tokens(2, 32, 1)
    with torch.no_grad():
        ref = model(ids).logits
    report = quantize_model(model, Recipe(method=method), tokens(4, 32, 0), progress=False)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max() < 0.05
    assert len(report.layers) == 2 and report.calib_tokens == 128
    if method == "haq":
        assert set(report.layers[0].alphas) == {g.name for g in adapter_for(model.config).layer_spec(model.config, 0).groups}


def test_gptq_lowers_the_output_error_of_a_real_layer(tiny_dir):
    """On the same calibration data GPTQ's layer outputs are closer to float than RTN's."""
    errors = {}
    for method in ("rtn", "gptq"):
        model = load(tiny_dir, "tiny-llama")
        ids = tokens(8, 64, 0)
        inputs, layer_kwargs = capture_layer_inputs(model, adapter_for(model.config), ids)
        layer, kwargs = adapter_for(model.config).decoder_layers(model)[0], layer_kwargs[0]
        ref = run_layer(layer, inputs, kwargs, 0)
        quantize_model(model, Recipe(method=method, abits=16), ids, progress=False)
        out = run_layer(layer, inputs, kwargs, 0)
        errors[method] = sum(float(((a - b) ** 2).sum()) for a, b in zip(out, ref))
    assert errors["gptq"] < errors["rtn"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral-random"])
def test_haq_keeps_gptq_only_where_it_lowers_the_block_error(tiny_dir, name, monkeypatch):
    """A GPTQ that returns worse weights than RTN (here: every level one step off) is rejected per
    layer, and the RTN weights of the smoothed layer are installed instead."""
    solve = pipeline._solve

    def spoiled(W, H, *args, **kwargs):
        q, scale = solve(W, H, *args, **kwargs)
        return (q.to(torch.int16) + 1).clamp(-127, 127).to(torch.int8), scale

    monkeypatch.setattr(pipeline, "_solve", spoiled)
    model = load(tiny_dir, name)
    report = quantize_model(model, Recipe(method="haq", alpha_step=0.25), tokens(4, 64, 0), progress=False)
    assert [layer.weights for layer in report.layers] == ["rtn"] * len(report.layers)
    q = adapter_for(model.config).decoder_layers(model)[0].get_submodule("self_attn.q_proj")
    assert bool((q.qweight.abs().amax(1) == 127).all())  # RTN: every row's largest weight at the grid's end


def test_interrupted_run_resumes_from_the_last_finished_layer(tiny_dir, tmp_path, interrupt_second_layer):
    calib = tokens(4, 32, 0)
    recipe = Recipe(method="gptq")
    straight = load(tiny_dir, "tiny-mixtral-random")
    quantize_model(straight, recipe, calib, progress=False)
    calls = interrupt_second_layer()
    with pytest.raises(KeyboardInterrupt):
        quantize_model(load(tiny_dir, "tiny-mixtral-random"), recipe, calib, work_dir=tmp_path, progress=False)
    resumed = load(tiny_dir, "tiny-mixtral-random")
    quantize_model(resumed, recipe, calib, work_dir=tmp_path, progress=False)
    assert calls == [0, 1, 1]  # layer 0 was not redone
    ids = tokens(2, 16, 3)
    with torch.no_grad():
        assert torch.equal(straight(ids).logits, resumed(ids).logits)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral-random"])
def test_layers_are_calibrated_on_the_device_and_come_back_to_the_host(tiny_dir, name, device, monkeypatch):
    """`device`: each layer, its calibration inputs and its keyword arguments are there while it
    runs; the quantized model ends in host memory and gives the host run's logits (on CUDA within
    the float noise W8A8's per-token rounding amplifies)."""
    seen = []

    def spy(layer, inputs, kwargs, index):
        tensors = [*layer.parameters(), *layer.buffers(), *inputs,
                   *(v for v in kwargs.values() if isinstance(v, torch.Tensor))]
        seen.append({t.device.type for t in tensors})
        return run_layer(layer, inputs, kwargs, index)

    monkeypatch.setattr(pipeline, "run_layer", spy)
    calib, recipe = tokens(4, 32, 0), Recipe(method="haq")
    model = load(tiny_dir, name)
    quantize_model(model, recipe, calib, progress=False, device=device)
    assert seen and all(types == {torch.device(device).type} for types in seen)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    monkeypatch.setattr(pipeline, "run_layer", run_layer)
    host = load(tiny_dir, name)
    quantize_model(host, recipe, calib, progress=False)
    ids = tokens(2, 16, 3)
    with torch.no_grad():
        got, want = model(ids).logits, host(ids).logits
    if device == "cpu":
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().mean() < 0.05 * want.abs().mean()


def test_nan_in_calibration_activations_is_a_clear_error(tiny_dir):
    model = load(tiny_dir, "tiny-llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("nan")
    with pytest.raises(HaqError, match="NaN or Inf"):
        quantize_model(model, Recipe(method="rtn"), tokens(2, 16, 0), progress=False)


def test_empty_calibration_is_a_clear_error(tiny_dir):
    model = load(tiny_dir, "tiny-llama")
    with pytest.raises(HaqError, match="calibration needs at least one window"):
        quantize_model(model, Recipe(method="rtn"), torch.zeros(0, 16, dtype=torch.long), progress=False)


def test_rarely_routed_experts_fall_back_with_a_warning(tiny_dir, caplog):
    model = load(tiny_dir, "tiny-mixtral-random")
    with caplog.at_level(logging.WARNING):
        quantize_model(model, Recipe(method="gptq", min_expert_tokens=10_000), tokens(1, 8, 0), progress=False)
    assert "RTN" in caplog.text
    with torch.no_grad():
        assert torch.isfinite(model(tokens(1, 8, 1)).logits).all()


def test_unknown_recipe_keys_and_architectures_are_rejected():
    with pytest.raises(HaqError, match="unknown recipe keys"):
        Recipe.from_dict({"method": "haq", "bogus": 1})

    class Config:
        model_type = "gpt2"

    with pytest.raises(HaqError, match="unsupported architecture 'gpt2'; supported: llama.*deepseek_v2.*gemma3_text"):
        adapter_for(Config())


class OffsetNorm(nn.Module):
    """A Gemma-style norm, x * (1 + w), where the adapter expects x * w."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach() - 1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


@pytest.mark.parametrize("fold", ["quantize", "rotate", "outliers"])
def test_a_norm_the_adapter_does_not_know_is_a_clear_error(tiny_dir, fold):
    """The function is unchanged (x * (1 + (w - 1)) = x * w), but folding into it as into x * w
    would be wrong: every fold refuses it, before any weight is touched."""
    from haq.models.outliers import inject_outliers
    from haq.quant.rotation import rotate_residual

    model = load(tiny_dir, "tiny-llama")
    model.model.layers[1].post_attention_layernorm = OffsetNorm(model.model.layers[1].post_attention_layernorm)
    run = {"quantize": lambda: quantize_model(model, Recipe(method="smoothquant"), tokens(2, 16, 0), progress=False),
           "rotate": lambda: rotate_residual(model), "outliers": lambda: inject_outliers(model)}[fold]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HaqError, match=r"layer 1 post_attention_layernorm: OffsetNorm does not compute x / rms\(x\) \* w"):
        run()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ARCHS)
def test_outlier_injection_preserves_the_float_function(tiny_dir, name):
    from haq.models.outliers import inject_outliers

    model = load(tiny_dir, name)
    ids = tokens(2, 16, 0)
    with torch.no_grad():
        before = model(ids).logits
        inject_outliers(model, channels=4, factor=50.0)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip_and_tampering(tiny_dir, tmp_path):
    from haq.checkpoint.native import load_quantized, save_quantized

    model = load(tiny_dir, "tiny-qwen2-moe")
    report = quantize_model(model, Recipe(method="rtn"), tokens(2, 16, 0), progress=False)
    out = save_quantized(model, None, tmp_path / "q", report, {"name": "random"})
    ids = tokens(1, 12, 1)
    with torch.no_grad():
        assert torch.equal(load_quantized(out)(ids).logits, model(ids).logits)
    # the int8 backend is part of every spec; another backend computes the same integers
    assert {spec["backend"] for spec in report.modules.values() if spec["type"] != "w8a16_linear"} == {"auto"}
    on_float = load_quantized(out, backend="float")
    assert {m.impl for m in on_float.modules() if isinstance(m, (Int8Linear, Int8Experts))} == {"float"}
    with torch.no_grad():
        torch.testing.assert_close(on_float(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(HaqError, match="checksum"):
        load_quantized(out)
    (out / "haq_config.json").write_text("{not json")
    with pytest.raises(HaqError, match="not JSON"):
        load_quantized(out)


def test_linears_reading_one_input_share_one_statistic_and_one_exact_solve(tiny_dir):
    """q/k/v (and gate/up) share one Hessian; smoothing updates it once; stacking their rows into one
    GPTQ solve gives exactly the separate solves."""
    from haq.quant.gptq import gptq_quantize
    from haq.quant.report import LayerReport

    model = load(tiny_dir, "tiny-llama")
    adapter = adapter_for(model.config)
    inputs, layer_kwargs = capture_layer_inputs(model, adapter, tokens(2, 32, 0))
    layer, spec = adapter.decoder_layers(model)[0], adapter.layer_spec(model.config, 0)
    with observe_layer(layer, spec, False) as stats:
        run_layer(layer, inputs, layer_kwargs[0], 0)
    q, k, v = (stats.linears[f"self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v and stats.linears["mlp.gate_proj"] is stats.linears["mlp.up_proj"]
    assert stats.linears["self_attn.o_proj"] is not q
    recipe = Recipe(method="haq", alpha_step=0.25)
    smooth_layer(layer, spec, stats, recipe, Probe(inputs[:1], layer_kwargs[0], run_layer(layer, inputs[:1], layer_kwargs[0], 0)))
    with observe_layer(layer, spec, False) as fresh:  # the smoothed layer's own inputs
        run_layer(layer, inputs, layer_kwargs[0], 0)
    torch.testing.assert_close(q.H, fresh.linears["self_attn.q_proj"].H, rtol=1e-4, atol=1e-6)
    hessians = {name: stats.linears[name].H for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")}
    solutions = pipeline._solve_linears(layer, spec, stats, recipe, LayerReport(0), "model.layers.0")
    assert q.H is None  # freed once solved
    for name, H in hessians.items():
        alone = gptq_quantize(layer.get_submodule(name).weight.data.float(), H)
        assert torch.equal(solutions[name][0], alone.qweight)
        torch.testing.assert_close(solutions[name][1], alone.scale)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral-random", "tiny-opt", "tiny-deepseek-v2", "tiny-gemma3"])
def test_replaying_the_attention_for_mlp_groups_changes_no_choice(tiny_dir, name, monkeypatch):
    """The MLP groups' search reuses the attention block's recorded outputs: the same quantized
    model as when every candidate runs the whole block, and the replay really served calls."""
    from haq.models.adapters import LayerSpec
    from haq.quant import fake_quant

    calib, recipe = tokens(4, 32, 0), Recipe(method="haq", search_tokens=64)
    served = []
    real_call = fake_quant.ReplayedAttention.__call__
    monkeypatch.setattr(fake_quant.ReplayedAttention, "__call__",
                        lambda self, *a, **k: served.append(self.recorded) or real_call(self, *a, **k))
    replayed = load(tiny_dir, name)
    quantize_model(replayed, recipe, calib, progress=False)
    assert any(served)
    monkeypatch.setattr(LayerSpec, "touches_attention", lambda self, group: True)
    whole = load(tiny_dir, name)
    quantize_model(whole, recipe, calib, progress=False)
    ids = tokens(2, 16, 3)
    with torch.no_grad():
        assert torch.equal(replayed(ids).logits, whole(ids).logits)
