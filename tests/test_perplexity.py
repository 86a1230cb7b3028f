import math

import torch

from haq.eval.perplexity import perplexity


def reference_ppl(model, windows):
    """Token by token: -log p(x_t | x_<t) from a fresh forward of each prefix."""
    total, count = 0.0, 0
    for window in windows:
        for t in range(1, len(window)):
            logits = model(window[None, :t]).logits[0, -1].double()
            total -= float(torch.log_softmax(logits, -1)[window[t]])
            count += 1
    return math.exp(total / count)


def test_perplexity_matches_token_by_token_reference(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-llama")).eval()
    windows = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_ppl(model, windows)
    result = perplexity(model, windows, progress=False)
    assert result.tokens == 3 * 11 and result.windows == 3 and result.seqlen == 12
    assert abs(result.ppl - expected) / expected < 1e-5
    # A random model over a 4096-token vocabulary is close to uniform.
    assert 1000 < result.ppl < 20000
