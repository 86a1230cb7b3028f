"""Decode steps of llama-layout attention in one kernel call (haq.runtime.decode_attention): the
same logits as HF's own attention, up to float rounding, for left-padded batches of several rows;
the same greedy tokens; everything but a float32 CPU decode step falls back to HF's forward."""
from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from haq.kernels import cpu
from haq.runtime import decode_attention
from haq.runtime.generation import BatchGenerator
from haq.runtime.sampling import SamplingParams

pytestmark = pytest.mark.skipif(cpu.library() is None, reason=f"no native kernels: {cpu.unavailable_reason()}")


def original_forwards(model):
    """Undo the wrapping for the duration of a block."""
    class Swap:
        def __enter__(self):
            self.saved = [(m, m.forward) for m in model.modules() if getattr(m, "_haq_decode", False)]
            for m, fwd in self.saved:
                m.forward = fwd.args[1]

        def __exit__(self, *exc):
            for m, fwd in self.saved:
                m.forward = fwd
    return Swap()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral-random", "tiny-qwen2-moe"])
def test_decode_logits_equal_hf_attention_for_a_padded_batch(tiny_dir, name: str, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir(name), dtype=torch.float32).eval()
    calls = []
    lib = cpu.library()
    real = lib.haq_decode_attention
    monkeypatch.setattr(lib, "haq_decode_attention", lambda *a: (calls.append(1), real(*a))[1])
    gen = BatchGenerator(model, max_batch=3, native=False)  # the module path (a float32 model would decode natively)
    assert decode_attention.install(model) == 0  # the generator installed it already: once per module
    g = torch.Generator().manual_seed(0)
    for n in (7, 2, 12):  # different lengths: rows 0 and 1 are left-padded
        gen.add(torch.randint(1, 200, (n,), generator=g).tolist(), SamplingParams(max_tokens=20, ignore_eos=True))
    for _ in range(4):
        gen.step()
    assert len(gen.running) == 3 and max(gen.pads) > 0
    rows, pads = gen.running, gen.pads
    width = pads[0] + rows[0].length
    ids = torch.tensor([[s.tokens[-1]] for s in rows])
    positions = torch.tensor([[s.length] for s in rows])
    mask = torch.ones(3, width + 1, dtype=torch.long)
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    logits = []
    for fast in (True, False):
        cache = copy.deepcopy(gen.cache)
        with torch.no_grad(), (nullcontext() if fast else original_forwards(model)):
            before = len(calls)
            out = model(ids, past_key_values=cache, attention_mask=mask, position_ids=positions, use_cache=True)
            assert (len(calls) > before) == fast
        logits.append(out.logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_greedy_tokens_equal_hf_generation(tiny_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-llama"), dtype=torch.float32).eval()
    prompt = list(range(3, 40))
    ids, expected = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(10):
            token = model(ids).logits[0, -1].argmax()
            expected.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    assert BatchGenerator(model, native=False).generate([prompt], SamplingParams(max_tokens=10))[0] == expected


def test_other_dtypes_and_prefill_run_hf_attention(tiny_dir, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-llama"), dtype=torch.bfloat16).eval()
    lib = cpu.library()
    monkeypatch.setattr(lib, "haq_decode_attention", lambda *a: pytest.fail("the kernel ran on bfloat16"))
    tokens = BatchGenerator(model).generate([[5, 6, 7]], SamplingParams(max_tokens=4))[0]
    assert len(tokens) == 4


@pytest.mark.parametrize("D", [8, 16, 32, 64, 128])  # the scalar, one-vector and four-vector score loops
@pytest.mark.parametrize("length", [30, 290])  # one chunk of columns; three (ATT_CHUNK = 128), the max rescaled
def test_kernel_attention_equals_a_torch_reference_for_every_head_width(D: int, length: int) -> None:
    """RoPE on q and the new k, the cache write at column `length`, GQA softmax attention over
    each row's unpadded columns, against the same in torch (float64)."""
    B, nh, kvh, cap = 2, 6, 2, length + 10
    g = torch.Generator().manual_seed(D)
    q, k, v = (torch.randn(B, n * D, generator=g) for n in (nh, kvh, kvh))
    kbuf, vbuf = torch.randn(B, kvh, cap, D, generator=g), torch.randn(B, kvh, cap, D, generator=g)
    angle = torch.rand(B, D // 2, generator=g) * 6.0
    cos, sin = torch.cat([angle.cos()] * 2, dim=1), torch.cat([angle.sin()] * 2, dim=1)
    pads, out, scale = torch.tensor([0, 7]), torch.empty(B, nh * D), D ** -0.5

    def rope(x: torch.Tensor) -> torch.Tensor:  # [B, heads, D], HF's rotate_half layout
        return x * cos[:, None] + torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1) * sin[:, None]

    keys, values = kbuf.double().clone(), vbuf.double().clone()
    keys[:, :, length] = rope(k.view(B, kvh, D)).double()
    values[:, :, length] = v.view(B, kvh, D).double()
    cpu.library().haq_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), nh * D, kvh * D, B, nh, kvh, D,
                                       cos.data_ptr(), sin.data_ptr(), kbuf.data_ptr(), vbuf.data_ptr(), cap, length,
                                       pads.data_ptr(), scale, out.data_ptr(), 1)
    torch.testing.assert_close(kbuf[:, :, length].double(), keys[:, :, length], rtol=1e-6, atol=1e-6)
    qr = rope(q.view(B, nh, D)).double()
    for b in range(B):
        for h in range(nh):
            cols = slice(int(pads[b]), length + 1)
            kk, vv = keys[b, h // (nh // kvh), cols], values[b, h // (nh // kvh), cols]
            expected = torch.softmax(kk @ qr[b, h] * scale, dim=0) @ vv
            torch.testing.assert_close(out[b, h * D:(h + 1) * D].double(), expected, rtol=1e-5, atol=1e-5)
