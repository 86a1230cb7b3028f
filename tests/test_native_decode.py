"""A whole decode step in one kernel call (haq.runtime.native_decode): the same logits and routing
as the module path for left-padded batches of int8 Mixtral and Llama checkpoints and of the float
models (up to float rounding), the engine at budget 0 decodes through it and still counts and records every call,
and every model it cannot run goes the module path with the reason said."""
from __future__ import annotations

import copy

import pytest
import torch

from haq.kernels import cpu
from haq.runtime.generation import BatchGenerator
from haq.runtime.native_decode import NativeDecoder
from haq.runtime.sampling import SamplingParams

pytestmark = pytest.mark.skipif(cpu.library() is None, reason=f"no native kernels: {cpu.unavailable_reason()}")


@pytest.fixture(scope="module")
def int8_dir(tiny_dir, tmp_path_factory):
    """An RTN W8A8 checkpoint of a tiny random model, loaded as haq loads it (q/k/v fused)."""
    from transformers import AutoModelForCausalLM

    from haq.checkpoint.native import save_quantized
    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe

    built = {}

    def make(name: str, lm_head: bool = False, rotate: bool = False):
        if (name, lm_head, rotate) not in built:
            model = AutoModelForCausalLM.from_pretrained(tiny_dir(name)).eval()
            report = quantize_model(model, Recipe(method="rtn", quantize_lm_head=lm_head, rotate="on" if rotate else "off"),
                                    torch.randint(0, 4096, (2, 32)), progress=False)
            out = tmp_path_factory.mktemp("int8") / name
            save_quantized(model, None, out, report, {"name": name})
            built[name, lm_head, rotate] = out
        return built[name, lm_head, rotate]

    return make


def padded_generator(model, lengths: tuple[int, ...] = (7, 2, 12), **kwargs) -> BatchGenerator:
    """Running rows of different lengths (all but the longest left-padded), four steps in."""
    gen = BatchGenerator(model, max_batch=len(lengths), **kwargs)
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        gen.add(torch.randint(1, 200, (n,), generator=g).tolist(), SamplingParams(max_tokens=20, ignore_eos=True))
    for _ in range(4):
        gen.step()
    assert len(gen.running) == len(lengths) and max(gen.pads) > 0
    return gen


@pytest.mark.parametrize("name,lm_head,rotate", [("tiny-mixtral-random", False, False), ("tiny-llama", False, False),
                                                 ("tiny-mixtral-random", True, False), ("tiny-llama", False, True),
                                                 ("tiny-mixtral-random", False, True)])
def test_a_step_equals_the_module_path_for_a_padded_batch(int8_dir, name: str, lm_head: bool, rotate: bool) -> None:
    """(rotate: the dense MLP's or the experts' down inputs rotate online inside the kernel.)"""
    from haq.checkpoint.native import load_quantized
    from haq.kernels.int8 import Int8Linear

    model = load_quantized(int8_dir(name, lm_head, rotate))
    if name == "tiny-llama":
        assert (model.model.layers[0].mlp.down_proj.online_rotation is not None) == rotate
    assert isinstance(model.lm_head, Int8Linear) == lm_head
    _check_step_against_the_module_path(model, name)


@pytest.mark.parametrize("name,lengths", [("tiny-mixtral-random", (7, 2, 12)), ("tiny-llama", (7, 2, 12)),
                                          ("tiny-llama", (7, 2, 12, 5, 9, 3))])
def test_a_float_step_equals_the_module_path_for_a_padded_batch(tiny_dir, name: str, lengths) -> None:
    """The unquantized model through the same step (every linear and expert float32); its q/k/v and
    gate/up weights now views of one tensor per layer, with the same values. Six rows: a tile of
    four rows per weight read, and two rows on their own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir(name)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _check_step_against_the_module_path(model, name, lengths)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    where = attn.q_proj.weight.data_ptr()
    assert NativeDecoder.build(model)[0] is not None and attn.q_proj.weight.data_ptr() == where  # fused once


def test_a_float_step_with_qkv_biases_equals_the_module_path() -> None:
    """Qwen2's q/k/v biases move into the fused bias with their weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         use_sliding_window=False)).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)  # zero at init: make them count
    _check_step_against_the_module_path(model, "qwen2")


def _check_step_against_the_module_path(model, name: str, lengths: tuple[int, ...] = (7, 2, 12)) -> None:
    gen = padded_generator(model, lengths)
    assert gen.native is not None, gen.native_reason
    rows, pads = gen.running, list(gen.pads)
    routed = {}  # the routers' top-k indices per layer, from the module path
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o, k=k: routed.__setitem__(k, o[2].clone()))
             for k, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    cache = copy.deepcopy(gen.cache)
    expected = gen._module_decode(rows)
    for h in hooks:
        h.remove()
    gen.cache = cache
    logits, routing = gen.native.step([s.tokens[-1] for s in rows], [s.length for s in rows], pads, cache)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for k, index in routed.items():  # the same experts, in the router's top-k order
        assert routing[k].tolist() == index.tolist()
    assert len(routed) == (len(model.model.layers) if "mixtral" in name else 0)
    if not routed:
        assert (routing == -1).all()  # dense layers route nothing
    for layer in cache.layers:  # one more column, written in place
        assert layer.get_seq_length() == pads[0] + rows[0].length + 1


def test_the_rotary_table_equals_the_models_rotary_module_at_every_position(int8_dir) -> None:
    """The step reads cos/sin from a table grown by doubling; rows must be the module's own output."""
    from haq.checkpoint.native import load_quantized

    model = load_quantized(int8_dir("tiny-llama"))
    decoder = NativeDecoder.build(model)[0]
    x = torch.zeros(3, model.config.hidden_size)
    for positions in ([0, 5, 255], [3, 300, 1100], [7, 8, 9]):  # the second grows the table past 256
        cos, sin = decoder._rotary(x, positions)
        want = model.model.rotary_emb(x[:, None], torch.tensor(positions)[:, None])
        assert torch.equal(cos, want[0][:, 0].float()) and torch.equal(sin, want[1][:, 0].float())


@pytest.mark.parametrize("weights", ["int8", "float32"])
def test_the_engine_at_budget_0_decodes_natively_and_counts_every_call(int8_dir, tiny_dir, weights: str) -> None:
    from transformers import AutoModelForCausalLM

    from haq.api import build_engine
    from haq.checkpoint.native import load_quantized
    from haq.runtime.hardware import load_profile
    from haq.runtime.record import record_trace

    path = int8_dir("tiny-mixtral-random") if weights == "int8" else tiny_dir("tiny-mixtral-random")
    load = load_quantized if weights == "int8" else (lambda p: AutoModelForCausalLM.from_pretrained(p).eval())
    trace = record_trace(load(path), torch.randint(0, 4096, (2, 32)), "q", progress=False)
    prompts = [[5, 9, 200, 31, 7], [44, 3]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    runs = []
    for native in (True, False):
        engine = build_engine(load(path), budget_bytes=0, hardware=load_profile("laptop"), profile=trace)
        make = engine.generator
        engine.generator = lambda *a, _make=make, _native=native, **k: _set_native(_make(*a, **k), _native)
        tokens, metrics = engine.generate_batch(prompts, params)
        runs.append((tokens, metrics, engine.last_trace("q")))
        engine.close()
    (tokens, metrics, trace_native), (tokens_module, metrics_module, trace_module) = runs
    assert tokens == tokens_module
    assert metrics.calls == metrics_module.calls and metrics.cpu_share == 1.0 and metrics.hit_rate == 0.0
    assert (trace_native.experts == trace_module.experts).all()


def _set_native(gen: BatchGenerator, native: bool) -> BatchGenerator:
    assert gen.native is not None, gen.native_reason
    if not native:
        gen.native = None
    return gen


def test_models_it_cannot_run_go_the_module_path_with_a_reason(tiny_dir, int8_dir) -> None:
    from transformers import AutoModelForCausalLM

    from haq.checkpoint.native import load_quantized

    bf16_model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-mixtral-random")).eval().to(torch.bfloat16)
    decoder, why = NativeDecoder.build(bf16_model)
    assert decoder is None and "not float32" in why
    mixed = load_quantized(int8_dir("tiny-llama"))
    mixed.model.layers[1].self_attn.o_proj = torch.nn.Linear(64, 64, bias=False)
    decoder, why = NativeDecoder.build(mixed)
    assert decoder is None and "layer 1 o_proj" in why and "Int8Linear" in why
    deepseek = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-deepseek-v2"))
    decoder, why = NativeDecoder.build(deepseek)
    assert decoder is None and "DeepseekV2DecoderLayer" in why
    gen = BatchGenerator(load_quantized(int8_dir("tiny-llama")), batch_invariant=True)
    assert gen.native is None  # the batch-invariant mode keeps its own fixed-order kernels
    tokens = BatchGenerator(bf16_model).generate([[5, 6, 7]], SamplingParams(max_tokens=3))[0]
    assert len(tokens) == 3


def test_an_int8_lm_head_saves_loads_and_refuses_export(int8_dir, tiny_dir, tmp_path) -> None:
    """quantize_lm_head: the head is int8 in the checkpoint and after loading (the tied embedding
    stays float and loads), its logits close to the float head's; export says why not."""
    from transformers import AutoModelForCausalLM

    from haq.checkpoint.compressed_tensors import export_checkpoint
    from haq.checkpoint.native import load_quantized, read_quant_config
    from haq.errors import HaqError

    path = int8_dir("tiny-mixtral-random", True)
    assert read_quant_config(path)["modules"]["lm_head"]["type"] == "int8_linear"
    model, plain = load_quantized(path), load_quantized(int8_dir("tiny-mixtral-random"))
    source = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-mixtral-random"))
    torch.testing.assert_close(model.model.embed_tokens.weight, source.model.embed_tokens.weight)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        int8_head, float_head = model(ids).logits, plain(ids).logits
    assert (int8_head - float_head).abs().max() < 0.05 * float_head.abs().max()
    with pytest.raises(HaqError, match="lm_head is int8"):
        export_checkpoint(path, tmp_path / "export")


def _odd_width_llama():
    """A float32 Llama whose widths are not multiples of 16 (the kernels' masked tails)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=20, vocab_size=203, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _native_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """Two steps in, the next native step's logits for `prompts` decoded together (no padding)."""
    gen = BatchGenerator(model, max_batch=len(prompts))
    for prompt in prompts:
        gen.add(prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    for _ in range(2):
        gen.step()
    assert gen.native is not None, gen.native_reason
    rows = gen.running
    return gen.native.step([s.tokens[-1] for s in rows], [s.length for s in rows], list(gen.pads), gen.cache)[0]


def test_float_rows_in_tiles_give_the_floats_of_one_row_at_a_time() -> None:
    """Four rows go through the 4 x 4 register tiles, one row alone through the row-by-row loop:
    the same floats, bit for bit (each output accumulates in the same order), masked tails included."""
    model = _odd_width_llama()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 200, (7,), generator=g).tolist() for _ in range(5)]
    together = _native_logits(model, prompts)
    for i, prompt in enumerate(prompts):
        assert torch.equal(together[i], _native_logits(model, [prompt])[0]), i
