"""The engine's static step with every expert resident (haq.runtime.resident): the same tokens as
the engine's own per-call decoding, the offloading modules back afterwards, and a clear refusal
when an expert is missing. On the CPU the step runs eagerly (int8 experts on Triton's interpreter)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from haq.api import build_engine
from haq.errors import HaqError
from haq.kernels import triton_int8
from haq.quant.pipeline import quantize_model
from haq.quant.recipe import Recipe
from haq.runtime.engine import OffloadedExperts
from haq.runtime.graphed_decode import greedy
from haq.runtime.hardware import load_profile
from haq.runtime.record import record_trace
from haq.runtime.resident import static_step


@pytest.fixture(scope="module")
def models(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-mixtral-random"), dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    int8 = copy.deepcopy(model)
    quantize_model(int8, Recipe(method="rtn"), ids[:1, :16], progress=False)
    return model, int8, record_trace(model, ids, "tiny-mixtral-random", progress=False)


def engine_at(model, trace, share: float):
    experts_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "experts" in n)
    experts_bytes += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "experts" in n)
    return build_engine(copy.deepcopy(model), budget_bytes=int(experts_bytes * share), policy="fiddler",
                        hardware=load_profile("rtx4090-pcie4"), profile=trace)


@pytest.mark.parametrize("weights", ["float", "int8"])
def test_the_static_step_gives_the_engines_tokens(models, weights: str) -> None:
    model, int8, trace = models
    if weights == "int8" and not triton_int8.available(torch.device("cpu")):
        pytest.skip("the int8 device path needs triton (TRITON_INTERPRET=1 on the CPU)")
    engine = engine_at(int8 if weights == "int8" else model, trace, 1.0)
    prompt = torch.randint(0, 4096, (1, 10), generator=torch.Generator().manual_seed(3))

    def storages():
        return {w.gate_up.untyped_storage().data_ptr() for w in engine.cache.values()}

    try:
        expected, _ = engine.generate(prompt, max_new_tokens=6)
        with static_step(engine, max_len=24) as decoder:
            assert len(storages()) == engine.store.num_layers  # the cache holds views of one stack per layer
            assert greedy(decoder, prompt, 6) == [expected]
        assert len(storages()) == len(engine.cache)  # and its own copies again afterwards
        assert all(isinstance(m, OffloadedExperts) for m in engine.model.modules() if "Experts" in type(m).__name__)
        with pytest.raises(HaqError, match="closed"):  # its graph would read the freed stacks
            decoder.step(torch.tensor([1]))
        again, _ = engine.generate(prompt, max_new_tokens=6)  # the per-call path, on the cache's own copies
    finally:
        engine.close()
    assert again == expected


def test_a_missing_expert_is_a_clear_refusal(models) -> None:
    model, _, trace = models
    engine = engine_at(model, trace, 0.5)
    try:
        with pytest.raises(HaqError, match="not resident"):
            with static_step(engine, max_len=24):
                pass
    finally:
        engine.close()
