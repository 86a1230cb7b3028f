"""Linears that read one input share one int8 GEMM (haq.kernels.shared_input): the same logits,
bit for bit, as each computing on its own; one copy of the weights; nothing held between inputs."""
from __future__ import annotations

import pytest
import torch

from haq.checkpoint.native import load_quantized, save_quantized
from haq.kernels.int8 import Int8Linear
from haq.kernels.shared_input import SharedInput, fusable
from haq.quant.pipeline import quantize_model
from haq.quant.recipe import Recipe


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral-random", "tiny-opt", "tiny-qwen2-moe"])
@pytest.mark.parametrize("impl", ["auto", "float"])
def test_fused_linears_give_the_same_logits(tiny_dir, tmp_path, name: str, impl: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir(name), dtype=torch.float32)
    report = quantize_model(model, Recipe(method="rtn"), torch.randint(0, 200, (2, 16)), progress=False)
    save_quantized(model, None, tmp_path / "q", report, {"name": name})
    fused, plain = load_quantized(tmp_path / "q", backend=impl), load_quantized(tmp_path / "q", backend=impl, fuse=False)
    groups = {id(m.shared[0]) for m in fused.modules() if isinstance(m, Int8Linear) and m.shared}
    assert len(groups) >= 2 * fused.config.num_hidden_layers or name != "tiny-llama"  # q/k/v and gate/up per layer
    assert groups  # every family here has q/k/v after one norm
    for rows in ([3], [1, 5]):  # prefill and a decode-sized batch
        ids = torch.randint(0, 200, (len(rows), rows[-1] + 4))
        with torch.no_grad():
            assert torch.equal(fused(ids).logits, plain(ids).logits)
    for module in fused.modules():  # after the forward, no group holds an input or outputs
        if isinstance(module, Int8Linear) and module.shared:
            assert module.shared[0]._input is None and not module.shared[0]._outputs


def test_members_are_views_and_a_changed_input_is_recomputed() -> None:
    torch.manual_seed(0)
    linears = [Int8Linear.from_float(torch.nn.Linear(32, n, bias=n == 8)) for n in (16, 8, 8)]
    alone = [m.qweight.clone() for m in linears]
    x = torch.randn(3, 32)
    expected = [m(x) for m in linears]
    group = SharedInput(linears)
    for m, q in zip(linears, alone):
        assert torch.equal(m.qweight, q) and m.qweight.untyped_storage().data_ptr() == \
            group.qweight.untyped_storage().data_ptr()
    assert all(torch.equal(m(x), y) for m, y in zip(linears, expected))
    first = linears[0](x)
    x.mul_(2)  # the same tensor, rewritten in place: a new input, not the cached one
    assert not torch.equal(linears[1](x), expected[1])
    assert torch.equal(linears[0](x), linears[0].shared[0].output(x.clone(), 0)) and not torch.equal(first,
                                                                                                     linears[0](x))


def test_only_compatible_linears_fuse() -> None:
    a, b = (Int8Linear.from_float(torch.nn.Linear(16, 8)) for _ in range(2))
    assert fusable([a, b])
    static = Int8Linear.from_float(torch.nn.Linear(16, 8), act_mode="per-tensor", input_scale=0.1)
    narrow = Int8Linear.from_float(torch.nn.Linear(12, 8))
    assert not fusable([a, static]) and not fusable([a, narrow]) and not fusable([a]) and \
        not fusable([a, torch.nn.Linear(16, 8)])
