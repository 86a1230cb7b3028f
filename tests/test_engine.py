"""The offloading engine on CPU: same tokens as the plain model at every budget and policy,
the budget respected, and clear errors for impossible requests."""
import copy

import pytest
import torch

from haq.errors import HaqError
from haq.api import build_engine
from haq.runtime.hardware import load_profile
from haq.runtime.profile_hw import measure_overhead_s_per_layer
from haq.runtime.record import record_trace


@pytest.fixture(scope="module")
def moe(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-mixtral-random")).eval()
    ids = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    return model, record_trace(model, ids, "tiny-mixtral-random", progress=False)


def greedy(model, ids, n):
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = model(ids).logits[0, -1].argmax()
            out.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


@pytest.mark.parametrize("policy", ["haq", "lru", "fiddler", "all-cpu", "transfer-always", "llamacpp"])
@pytest.mark.parametrize("budget_pct", [0, 25, 50, 75, 100])
def test_engine_generates_exactly_the_plain_models_tokens(moe, policy, budget_pct):
    model, trace = moe
    prompt = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(5))
    expected = greedy(model, prompt, 8)
    offloaded = copy.deepcopy(model)
    experts_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "experts" in n)
    engine = build_engine(offloaded, budget_bytes=experts_bytes * budget_pct // 100,
                          hardware=load_profile("rtx4090-pcie4"),
                    policy=policy, profile=trace)
    tokens, metrics = engine.generate(prompt, max_new_tokens=8)
    engine.close()
    assert tokens == expected
    assert metrics.device_bytes["experts_peak"] <= engine.budget_bytes
    assert 0.0 <= metrics.hit_rate <= 1.0 and metrics.calls > 0
    if budget_pct == 0 or policy == "all-cpu":
        assert metrics.hit_rate == 0.0
    assert len(metrics.token_latency_ms) == 7


def test_overhead_measurement_leaves_the_engine_as_it_was(moe):
    model, trace = moe
    prompt = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(5))
    expected = greedy(model, prompt, 4)
    engine = build_engine(copy.deepcopy(model), budget_bytes=0, hardware=load_profile("laptop"), policy="haq",
                    profile=trace)
    math, policy = engine.store.math, engine.policy
    assert measure_overhead_s_per_layer(engine, prompt, steps=2) > 0
    assert engine.store.math is math and engine.policy is policy and sum(engine.calls) == 0
    tokens, _ = engine.generate(prompt, max_new_tokens=4)
    engine.close()
    assert tokens == expected


def test_a_quantized_checkpoint_runs_offloaded_with_identical_tokens(moe, tmp_path):
    from haq.checkpoint.native import load_quantized, save_quantized
    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe

    model, trace = moe
    quantized = copy.deepcopy(model)
    report = quantize_model(quantized, Recipe(method="rtn"), torch.randint(0, 4096, (2, 32)), progress=False)
    save_quantized(quantized, None, tmp_path / "q", report, {"name": "random"})
    plain = load_quantized(tmp_path / "q")
    prompt = torch.randint(0, 4096, (1, 10), generator=torch.Generator().manual_seed(2))
    expected = greedy(plain, prompt, 6)
    engine = build_engine(load_quantized(tmp_path / "q"), budget_bytes=10**9 // 1000, hardware=load_profile("laptop"),
                    policy="haq", profile=trace)
    tokens, metrics = engine.generate(prompt, max_new_tokens=6)
    engine.close()
    assert tokens == expected
    assert metrics.expert_bytes < sum(p.numel() * 4 for n, p in model.named_parameters() if "experts.gate_up" in n)


def test_impossible_budgets_and_dense_models_are_clear_errors(moe, tiny_dir):
    from transformers import AutoModelForCausalLM

    model, trace = moe
    hardware = load_profile("rtx4090-pcie4")
    with pytest.raises(HaqError, match="below one expert"):
        build_engine(copy.deepcopy(model), budget_bytes=10, hardware=hardware, profile=trace)
    with pytest.raises(HaqError, match="exceeds the device memory"):
        build_engine(copy.deepcopy(model), budget_bytes=2**60, hardware=hardware, profile=trace)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-llama"))
    with pytest.raises(HaqError, match="dense model"):
        build_engine(dense, budget_bytes=0, hardware=hardware, profile=trace)


def test_budget_parsing():
    from haq.api import parse_budget

    assert parse_budget("25%", 1000) == 250
    assert parse_budget("2MiB", 0) == 2 * 2**20
    assert parse_budget("1.5GB", 0) == 1_500_000_000
    assert parse_budget("1TiB", 0) == 2**40
    with pytest.raises(HaqError, match="--gpu-budget"):
        parse_budget("lots", 1000)
    with pytest.raises(HaqError, match="whole number.*50%"):  # half a byte: the user meant a share
        parse_budget("0.5", 1000)


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-deepseek-v2", "tiny-deepseek-v3"])
@pytest.mark.parametrize("budget_pct", [0, 50, 100])
def test_every_moe_family_runs_offloaded_with_the_plain_models_tokens(tiny_dir, name, budget_pct):
    """Shared experts and dense layers (DeepSeek's first layer) stay on the device; only the routed
    experts of the MoE layers are offloaded, indexed by MoE layer in the store and the trace."""
    from transformers import AutoModelForCausalLM

    from haq.models.adapters import adapter_for

    model = AutoModelForCausalLM.from_pretrained(tiny_dir(name)).eval()
    adapter = adapter_for(model.config)
    trace = record_trace(model, torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0)), name,
                         progress=False)
    assert trace.meta.layers == len(adapter.moe_layers(model.config))
    prompt = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(5))
    expected = greedy(model, prompt, 6)
    experts_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    engine = build_engine(copy.deepcopy(model), budget_bytes=experts_bytes * budget_pct // 100,
                          hardware=load_profile("rtx4090-pcie4"), policy="haq", profile=trace)
    tokens, metrics = engine.generate(prompt, max_new_tokens=6)
    engine.close()
    assert tokens == expected
    assert engine.store.num_layers == trace.meta.layers and metrics.calls > 0
    assert metrics.device_bytes["experts_peak"] <= engine.budget_bytes
    if budget_pct == 0:
        assert metrics.hit_rate == 0.0


def test_a_quantized_deepseek_checkpoint_runs_offloaded_with_identical_tokens(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from haq.checkpoint.native import load_quantized, save_quantized
    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-deepseek-v2")).eval()
    report = quantize_model(model, Recipe(method="haq", alpha_step=0.5), torch.randint(0, 4096, (2, 32)),
                            progress=False)
    save_quantized(model, None, tmp_path / "q", report, {"name": "random"})
    plain = load_quantized(tmp_path / "q")
    trace = record_trace(plain, torch.randint(0, 4096, (2, 32)), "q", progress=False)
    prompt = torch.randint(0, 4096, (1, 10), generator=torch.Generator().manual_seed(2))
    expected = greedy(plain, prompt, 6)
    engine = build_engine(load_quantized(tmp_path / "q"), budget_bytes=0, hardware=load_profile("laptop"),
                          policy="haq", profile=trace)
    tokens, _ = engine.generate(prompt, max_new_tokens=6)
    engine.close()
    assert tokens == expected


def test_a_routing_profile_of_another_model_or_empty_is_a_clear_error(moe):
    import dataclasses

    from haq.runtime.synthetic import generate_synthetic_trace

    model, trace = moe
    hardware = load_profile("laptop")
    mixtral_8x7b = generate_synthetic_trace(num_sequences=1, seq_len=8, seed=0)  # 32 layers x 8 experts
    with pytest.raises(HaqError, match="32 MoE layers, 8 experts, top-2.*is not this model's"):
        build_engine(copy.deepcopy(model), budget_bytes=0, hardware=hardware, profile=mixtral_8x7b)
    wrong_k = dataclasses.replace(trace, meta=dataclasses.replace(trace.meta, top_k=1))
    with pytest.raises(HaqError, match="top-1.*is not this model's"):
        build_engine(copy.deepcopy(model), budget_bytes=0, hardware=hardware, profile=wrong_k)
    empty = dataclasses.replace(trace, experts=trace.experts[:0], seq_id=trace.seq_id[:0], pos=trace.pos[:0],
                                weights=None)
    with pytest.raises(HaqError, match="has no tokens"):
        build_engine(copy.deepcopy(model), budget_bytes=0, hardware=hardware, profile=empty)
