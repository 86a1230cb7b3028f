"""Residual-stream rotation: orthogonal, exact on every rotatable architecture, rejected on OPT."""
import pytest
import torch

from haq.errors import HaqError
from haq.quant.pipeline import quantize_model
from haq.quant.recipe import Recipe
from haq.kernels.rotation import OnlineRotation, _hadamard_order, _paley, hadamard, hadamard_pm1, rotation_matrix
from haq.quant.rotation import rotate_online_inputs, rotate_residual


def load(tiny_dir, name):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir(name)).eval()


def tokens(n, length, seed):
    return torch.randint(0, 4096, (n, length), generator=torch.Generator().manual_seed(seed))


def assert_rewrite_keeps_logits(model, rewrite) -> None:
    ids = tokens(2, 16, 0)
    with torch.no_grad():
        before = model(ids).logits
        rewrite(model)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [64, 576, 96, 7])
def test_rotation_matrix_is_orthogonal_and_spreads_every_channel(n):
    Q = rotation_matrix(n, seed=3)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(Q, rotation_matrix(n, seed=3))  # seeded: a resumed run rotates the same way
    if n & (n - 1) == 0:  # randomized Hadamard: every entry +-1/sqrt(n), the flattest possible
        torch.testing.assert_close(Q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))
    H = hadamard(8) * 8 ** 0.5
    assert set(H.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 60, 96, 1536])
def test_hadamard_matrices_of_paley_orders(n):
    H = hadamard_pm1(n)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(H @ H.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("n, order", [(14336, 28), (18944, 148)])  # Mixtral's and Qwen2-7B's intermediate sizes
def test_large_orders_use_a_paley_factor(n, order):
    """Too large to multiply out in a test: the Paley factor is a Hadamard matrix, and the seeded
    rotation (factors A, B) is +-1 up to scale, so sqrt(n) R is a Hadamard matrix too."""
    assert _hadamard_order(n) == order
    P = _paley(order)
    torch.testing.assert_close(P @ P.T, order * torch.eye(order, dtype=torch.float64), rtol=0, atol=0)
    assert OnlineRotation.seeded(n).is_hadamard


def test_orders_without_a_construction_fall_back_to_an_orthogonal_rotation():
    assert hadamard_pm1(172) is None  # 43 x 4 needs a Williamson matrix
    rotation = OnlineRotation.seeded(11008)  # Llama-2-7B's intermediate size, 43 x 256
    assert not rotation.is_hadamard
    for M in (rotation.A.double(), rotation.B.double()):  # orthogonal factors: A kron B is orthogonal
        torch.testing.assert_close(M @ M.T, torch.eye(M.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral-random", "tiny-qwen2-moe", "tiny-qwen3-moe",
                                  "tiny-deepseek-v2", "tiny-deepseek-v3"])
def test_rotation_keeps_the_float_function(tiny_dir, name):
    model = load(tiny_dir, name)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2: must be untied
    assert_rewrite_keeps_logits(model, rotate_residual)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_rotation_flattens_an_outlier_channel(tiny_dir):
    """The embedding of a token with one huge channel: after rotation its per-token absmax (what
    sets the int8 step) falls toward norm / sqrt(hidden)."""
    model = load(tiny_dir, "tiny-llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 7] = 100.0
        rotate_residual(model)
    row = model.model.embed_tokens.weight[5]
    assert row.abs().max() < 0.25 * row.norm()


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gemma3"])
def test_rotation_of_unrotatable_models_is_a_clear_error(tiny_dir, name):
    """OPT's LayerNorms subtract the mean; Gemma3 normalizes each block's output before the residual add."""
    model = load(tiny_dir, name)
    with pytest.raises(HaqError, match=f"not supported for '{model.config.model_type}'.*supported: llama"):
        rotate_residual(model)


@pytest.mark.parametrize("n", [1536, 96])
def test_online_rotation_is_its_kronecker_matrix(n):
    rotation = OnlineRotation.seeded(n, seed=1)
    a, b = rotation.sizes
    assert a * b == n and a & (a - 1) == 0
    assert rotation.is_hadamard  # 1536 = 12 x 128, 96 = 12 x 8: Paley's order 12 kron Sylvester's
    R = rotation.matrix()
    torch.testing.assert_close(R @ R.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-6)
    x = torch.randn(2, 3, n, dtype=torch.float64)
    torch.testing.assert_close(rotation.double()(x), x @ R)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-deepseek-v2", "tiny-mixtral-random"])
def test_online_rotation_keeps_the_float_function(tiny_dir, name):
    """Dense down_proj inputs (every Llama layer; DeepSeek's dense first layer) and the routed
    experts' down inputs (DeepSeek's later layers, every Mixtral layer)."""
    model = load(tiny_dir, name)
    assert_rewrite_keeps_logits(model, rotate_online_inputs)
    dense = [layer for layer in model.model.layers if hasattr(layer.mlp, "down_proj")]
    moe = [layer for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert all(layer.mlp.down_proj.online_rotation is not None for layer in dense)
    assert all(layer.mlp.experts.down_rotation is not None for layer in moe)
    assert (len(dense) > 0) == (name != "tiny-mixtral-random") and (len(moe) > 0) == (name != "tiny-llama")


def test_rotated_layers_are_freed_without_the_cyclic_collector(tiny_dir):
    """An offloaded run releases each layer by dropping its last reference: a rotated layer must
    not sit in a reference cycle (a whole Mixtral layer's experts would stay until gc runs)."""
    import gc
    import weakref

    model = load(tiny_dir, "tiny-mixtral-random")
    rotate_online_inputs(model)
    gc.disable()
    try:
        experts = weakref.ref(model.model.layers[0].mlp.experts)
        del model
        assert experts() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral-random"])
def test_rotated_checkpoint_round_trip(tiny_dir, tmp_path, name):
    from haq.checkpoint.native import load_quantized, save_quantized
    from haq.kernels.int8 import Int8Linear

    model = load(tiny_dir, name)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    report = quantize_model(model, Recipe(method="haq", alpha_step=0.25, rotate="on"), tokens(2, 16, 0),
                            progress=False)
    out = save_quantized(model, None, tmp_path / "q", report, {"name": "random"})
    ids = tokens(1, 12, 1)
    loaded = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if name == "tiny-llama":  # dense down_proj: the int8 module rotates its input
        down = loaded.model.layers[0].mlp.down_proj
        assert isinstance(down, Int8Linear) and down.online_rotation is not None
    else:  # every expert's down input, by one rotation per layer
        assert all(layer.mlp.experts.down_rotation is not None for layer in loaded.model.layers)
    assert all(layer.alphas["up->down"] is None for layer in report.layers)  # smoothing skips rotated inputs


def test_rotated_checkpoint_exports_as_a_hadamard_transform(tiny_dir, tmp_path):
    """The dense down_proj inputs' rotation becomes a compressed-tensors transform_config with each
    +-1 matrix stored; our reader of the export, applying x W / sqrt(n) densely, gives the logits
    of the A kron B rotation up to float32 rounding of the rotated input."""
    import json

    from safetensors.torch import load_file

    from haq.checkpoint.compressed_tensors import export_checkpoint, load_compressed_tensors
    from haq.checkpoint.native import load_quantized, save_quantized

    model = load(tiny_dir, "tiny-llama")
    report = quantize_model(model, Recipe(method="rtn", rotate="on"), tokens(2, 16, 0), progress=False)
    ckpt = save_quantized(model, None, tmp_path / "q", report, {"name": "random"})
    out = export_checkpoint(ckpt, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (scheme,) = qc["transform_config"]["config_groups"].values()
    (args,) = scheme["apply"]
    layers = len(model.model.layers)
    assert args["location"] == "input" and args["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in range(layers)]
    tensors = load_file(out / "model.safetensors")
    W = tensors["model.layers.0.mlp.down_proj.online_input_input.weight"].double()
    n = W.shape[0]
    assert set(W.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(W @ W.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(W / n ** 0.5, model.model.layers[0].mlp.down_proj.online_rotation.matrix())
    ids = tokens(1, 12, 1)
    with torch.no_grad():
        reloaded, ours = load_compressed_tensors(out)(ids).logits, load_quantized(ckpt)(ids).logits
    assert (reloaded - ours).abs().max() < 1e-3 * ours.abs().max()


def test_rotated_experts_export_one_transform_per_expert_down(tiny_dir, tmp_path):
    """Every expert's down_proj is a transform target; the one +-1 matrix of their order is stored
    once (compressed-tensors shares a matrix per order); our reader folds the targets back into one
    rotation per layer and gives the checkpoint's logits."""
    import json

    from safetensors.torch import load_file

    from haq.checkpoint.compressed_tensors import export_checkpoint, load_compressed_tensors
    from haq.checkpoint.native import load_quantized, save_quantized

    model = load(tiny_dir, "tiny-mixtral-random")
    report = quantize_model(model, Recipe(method="rtn", rotate="on"), tokens(2, 16, 0), progress=False)
    ckpt = save_quantized(model, None, tmp_path / "q", report, {"name": "random"})
    out = export_checkpoint(ckpt, tmp_path / "ct")
    (scheme,) = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"][
        "config_groups"].values()
    E, layers = model.config.num_local_experts, len(model.model.layers)
    assert scheme["apply"][0]["targets"] == [f"model.layers.{i}.block_sparse_moe.experts.{e}.w2"
                                             for i in range(layers) for e in range(E)]
    stored = {k: v for k, v in load_file(out / "model.safetensors").items() if k.endswith("_input.weight")}
    assert list(stored) == ["model.layers.0.block_sparse_moe.experts.0.w2.online_input_input.weight"]
    W = next(iter(stored.values())).double()
    torch.testing.assert_close(W / W.shape[0] ** 0.5, model.model.layers[1].mlp.experts.down_rotation.matrix())
    ids = tokens(1, 12, 1)
    with torch.no_grad():
        reloaded, ours = load_compressed_tensors(out)(ids).logits, load_quantized(ckpt)(ids).logits
    assert (reloaded - ours).abs().max() < 1e-3 * ours.abs().max()


def test_export_refuses_an_online_rotation_that_is_not_hadamard(tiny_dir, tmp_path):
    from haq.checkpoint.native import save_quantized
    from haq.checkpoint.compressed_tensors import export_checkpoint

    model = load(tiny_dir, "tiny-llama")
    report = quantize_model(model, Recipe(method="rtn", rotate="on"), tokens(2, 16, 0), progress=False)
    down = model.model.layers[0].mlp.down_proj
    b = down.online_rotation.sizes[1]
    down.online_rotation.B.copy_(torch.linalg.qr(torch.randn(b, b, generator=torch.Generator().manual_seed(1)))[0])
    out = save_quantized(model, None, tmp_path / "q", report, {"name": "random"})
    with pytest.raises(HaqError, match="not a Hadamard matrix"):
        export_checkpoint(out, tmp_path / "ct")
