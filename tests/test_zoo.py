import pytest
import torch

from haq.errors import HaqError
from haq.zoo.tiny_random import TINY_CONFIGS


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_configs_build_and_run(tiny_dir, name):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir(name)).eval()
    logits = model(torch.arange(8)[None]).logits
    assert logits.shape == (1, 8, 4096) and torch.isfinite(logits).all()


def test_upcycled_moe_computes_the_dense_function(tiny_dir):
    from transformers import AutoModelForCausalLM

    from haq.zoo.smollm2 import kmeans_centroids, moe_inputs, upcycle_to_mixtral

    dense = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-llama")).eval()
    ids = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(0))
    centroids = [kmeans_centroids(x, 8) for x in moe_inputs(dense, ids)]
    moe = upcycle_to_mixtral(dense, centroids).eval()
    with torch.no_grad():
        out = moe(ids, output_router_logits=True)
        diff = (out.logits - dense(ids).logits).abs().max()
    assert diff < 1e-4
    # Routing is data dependent: several experts are chosen in every layer.
    for logits in out.router_logits:
        assert len(torch.unique(logits.topk(2, -1).indices)) >= 3


def test_kmeans_is_deterministic_and_unit_norm():
    from haq.zoo.smollm2 import kmeans_centroids

    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(1))
    a, b = kmeans_centroids(x, 8), kmeans_centroids(x, 8)
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(8), atol=1e-5)


def test_unknown_zoo_model_is_a_clear_error():
    from haq import zoo

    with pytest.raises(HaqError, match="unknown zoo model 'nope'"):
        zoo.build("nope")


def test_router_rows_ignore_the_shared_component_of_the_inputs():
    from haq.zoo.smollm2 import router_rows

    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=gen) * 2
    x = centers[torch.randint(0, 8, (4000,), generator=gen)] + torch.randn(4000, 16, generator=gen) * 0.3
    x = x + torch.tensor([20.0] + [0.0] * 15)  # a large component every token shares
    rows = router_rows(x, 8)
    mean = x.mean(0)
    assert torch.allclose(rows @ mean, torch.zeros(8), atol=1e-3)  # logits = rows . (x - mean)
    counts = torch.bincount((x @ rows.T).topk(2, -1).indices.reshape(-1), minlength=8).float()
    assert counts.min() > 0 and counts.max() / counts.min() < 4


def test_smollm2_folder_has_the_gguf_weights(smollm2_dir):
    """The saved safetensors model computes what transformers' GGUF loader gives."""
    from transformers import AutoModelForCausalLM

    from haq.zoo.smollm2 import load_from_gguf

    gguf_model, tokenizer = load_from_gguf()
    saved = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is Paris. The capital of Italy", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, gguf_model.eval()(ids).logits)


def test_real_upcycled_moe_equals_smollm2(smollm2_dir):
    """smollm2-8x135m's construction on the real weights: logits equal the dense model's."""
    from transformers import AutoModelForCausalLM

    from haq.zoo.smollm2 import moe_inputs, router_rows, upcycle_to_mixtral

    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, dense.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    routers = [router_rows(x, 8, seed=i) for i, x in enumerate(moe_inputs(dense, ids))]
    moe = upcycle_to_mixtral(dense, routers).eval()
    with torch.no_grad():
        out = moe(ids, output_router_logits=True)
        diff = (out.logits - dense(ids).logits).abs().max()
    assert diff < 1e-3 * dense(ids).logits.abs().max()
    assert all(len(torch.unique(r.topk(2, -1).indices)) == 8 for r in out.router_logits)
