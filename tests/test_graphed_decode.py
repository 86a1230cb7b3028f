"""The static decode step (haq.runtime.graphed_decode): on the CPU it runs eagerly and must equal
transformers' own decoding; its int8 MoE step must read nothing on the host (what a CUDA graph
capture needs), checked with fake tensors."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM, DynamicCache

from haq.errors import HaqError
from haq.kernels import triton_int8
from haq.kernels.experts import Int8Experts
from haq.quant.pipeline import quantize_model
from haq.quant.recipe import Recipe
from haq.runtime.graphed_decode import GraphedDecoder, greedy


def hf_decode(model, prompts: torch.Tensor, new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and each step's logits through transformers' dynamic cache."""
    cache = DynamicCache(config=model.config)
    out = model(prompts, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(new_tokens - 1):
        out = model(logits[-1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack([t.argmax(-1) for t in logits], 1).tolist(), logits


@pytest.fixture(scope="module")
def tiny_mixtral(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-mixtral-random"), dtype=torch.float32).eval()


@torch.no_grad()
def test_the_static_step_equals_transformers_decoding(tiny_mixtral) -> None:
    prompts = torch.randint(0, tiny_mixtral.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    tokens, ref_logits = hf_decode(tiny_mixtral, prompts, 6)
    decoder = GraphedDecoder(tiny_mixtral, max_len=16, batch=2)
    assert not decoder.graphs  # a CPU model runs the step eagerly
    logits = [decoder.prefill(prompts)]
    for t in range(5):
        logits.append(decoder.step(torch.tensor([row[t] for row in tokens])).clone())
    for ours, ref in zip(logits, ref_logits):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert greedy(decoder, prompts, 6) == tokens  # and it starts over cleanly on new prompts


def test_misuse_is_a_one_line_error(tiny_mixtral) -> None:
    decoder = GraphedDecoder(tiny_mixtral, max_len=4)
    with pytest.raises(HaqError, match="before prefill"):
        decoder.step(torch.tensor([1]))
    with pytest.raises(HaqError, match="no room"):
        decoder.prefill(torch.ones(1, 4, dtype=torch.long))
    decoder.prefill(torch.ones(1, 3, dtype=torch.long))
    decoder.step(torch.tensor([1]))
    with pytest.raises(HaqError, match="cache is full"):
        decoder.step(torch.tensor([1]))
    pair = GraphedDecoder(tiny_mixtral, max_len=6, batch=2)
    pair.prefill(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(HaqError, match="one token per row"):
        pair.step(torch.tensor([1]))
    with pytest.raises(HaqError, match="CUDA graphs need"):
        GraphedDecoder(tiny_mixtral.cpu(), max_len=4, graphs=True)
    with pytest.raises(HaqError, match="new_tokens"):
        greedy(GraphedDecoder(tiny_mixtral, max_len=4), torch.ones(1, 2, dtype=torch.long), 0)


@torch.no_grad()
def test_the_warm_up_before_a_capture_leaves_the_step_as_it_was(tiny_mixtral) -> None:
    """Even at the cache's last column (a capture on the last step must not write past it)."""
    prompt = torch.randint(0, tiny_mixtral.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    plain, warmed = GraphedDecoder(tiny_mixtral, max_len=6), GraphedDecoder(tiny_mixtral, max_len=6)
    token = plain.prefill(prompt).argmax(-1)
    warmed.prefill(prompt)
    warmed.ids.copy_(token.reshape(1, 1))
    warmed._warm_up()
    torch.testing.assert_close(warmed.step(token), plain.step(token), rtol=0, atol=0)


def test_experts_that_read_the_routing_on_the_host_cannot_be_captured(tiny_dir) -> None:
    """Checked before any capture (here directly: a capture needs CUDA): transformers' eager experts,
    haq's call-by-call int8 experts, the engine's offloaded ones."""
    from haq.runtime.graphed_decode import capture_refusal

    eager = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-mixtral-random"), experts_implementation="eager")
    assert "set_experts_implementation" in capture_refusal(eager)
    eager.set_experts_implementation("grouped_mm")
    assert capture_refusal(eager) is None
    int8 = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-mixtral-random"), dtype=torch.float32).eval()
    quantize_model(int8, Recipe(method="rtn"), torch.randint(0, 4096, (1, 16)), progress=False)
    assert "call by call" in capture_refusal(int8)  # on the CPU, "auto" experts go call by call


def test_sliding_window_attention_is_refused(tiny_dir) -> None:
    gemma = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-gemma3")).eval()
    with pytest.raises(HaqError, match="sliding-window"):
        GraphedDecoder(gemma, max_len=8)


@pytest.mark.skipif(not triton_int8.available(torch.device("cpu")), reason="needs triton (TRITON_INTERPRET=1)")
@torch.no_grad()
def test_an_int8_moe_decode_step_reads_no_routing_on_the_host(tiny_dir) -> None:
    """The whole step (attention on the static cache, the router, the int8 experts on the device
    path) under fake tensors: a `tolist`, `nonzero` or data-sized output anywhere would raise."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-mixtral-random"), dtype=torch.float32).eval()
    quantize_model(model, Recipe(method="rtn"), torch.randint(0, model.config.vocab_size, (1, 16)), progress=False)
    experts = [m for m in model.modules() if isinstance(m, Int8Experts)]
    assert experts
    for module in model.modules():
        if hasattr(module, "impl"):  # linears on the plain float GEMMs (fake-able), experts on Triton's
            module.impl = "triton" if isinstance(module, Int8Experts) else "float"
    decoder = GraphedDecoder(model, max_len=12)
    decoder.prefill(torch.randint(0, model.config.vocab_size, (1, 5)))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        decoder.ids = mode.from_tensor(decoder.ids)
        assert decoder._forward().shape == (1, model.config.vocab_size)
