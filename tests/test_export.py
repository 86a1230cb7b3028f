"""compressed-tensors export: layout, config, and a bit-exact round trip through our own reader.
(The reload by compressed-tensors itself runs in bench/peers.py, in the peers' venv.)"""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from haq.checkpoint.native import load_quantized, save_quantized
from haq.errors import HaqError
from haq.checkpoint.compressed_tensors import PROVENANCE_NAME, export_checkpoint, load_compressed_tensors
from haq.quant.pipeline import quantize_model
from haq.quant.recipe import Recipe

ARCHS = ["tiny-llama", "tiny-mixtral-random", "tiny-opt", "tiny-qwen2-moe"]  # qwen3_moe: same names as qwen2_moe


def tokens(n, length, seed):
    return torch.randint(0, 4096, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    """RTN checkpoints of the tiny models, each built once per module (read-only for the tests)."""
    from transformers import AutoModelForCausalLM

    built = {}

    def make(name, **recipe):
        key = (name, tuple(sorted(recipe.items())))
        if key not in built:
            model = AutoModelForCausalLM.from_pretrained(tiny_dir(name)).eval()
            report = quantize_model(model, Recipe(method="rtn", **recipe), tokens(2, 16, 0), progress=False)
            built[key] = save_quantized(model, None, tmp_path_factory.mktemp(name) / "q", report, {"name": "random"})
        return built[key]

    return make


def keys(path):
    with safe_open(path, "pt") as handle:
        return set(handle.keys())


@pytest.mark.parametrize("name", ARCHS)
def test_export_has_the_hf_checkpoint_names_and_reproduces_our_logits(tiny_dir, checkpoints, tmp_path, name):
    ckpt = checkpoints(name)
    out = export_checkpoint(ckpt, tmp_path / "ct")
    tensors = load_file(out / "model.safetensors")
    # Every tensor of the float model's own save_pretrained (original HF names, per-expert
    # linears for MoE) is there, plus one weight_scale per quantized linear, and nothing else.
    float_keys = keys(tiny_dir(name) / "model.safetensors")
    scales = {k for k in tensors if k.endswith(".weight_scale")}
    assert set(tensors) - scales == float_keys
    assert scales
    for key in scales:
        weight = tensors[key.removesuffix("_scale")]
        assert weight.dtype == torch.int8 and tensors[key].shape == (weight.shape[0], 1)
        assert tensors[key].dtype == torch.float32
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors", "int-quantized", "compressed")
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    assert {k: group["input_activations"][k] for k in ("strategy", "dynamic")} == {"strategy": "token",
                                                                                     "dynamic": True}
    assert "lm_head" in qc["ignore"]
    # every ignored module is a high-precision linear of the export, never a quantized one
    for module in qc["ignore"][1:]:
        assert f"{module}.weight" in tensors and f"{module}.weight_scale" not in tensors
    assert json.loads((out / PROVENANCE_NAME).read_text())["recipe"]["method"] == "rtn"
    ids = tokens(1, 12, 1)
    with torch.no_grad():
        assert torch.equal(load_compressed_tensors(out)(ids).logits, load_quantized(ckpt)(ids).logits)


def test_mixtral_experts_use_w1_gate_w3_up_w2_down(checkpoints, tmp_path):
    ckpt = checkpoints("tiny-mixtral-random")
    ours = load_file(ckpt / "model.safetensors")
    theirs = load_file(export_checkpoint(ckpt, tmp_path / "ct") / "model.safetensors")
    gate_up, down = ours["model.layers.1.mlp.experts.gate_up_q"], ours["model.layers.1.mlp.experts.down_q"]
    I = down.shape[2]
    prefix = "model.layers.1.block_sparse_moe.experts.3"
    assert torch.equal(theirs[f"{prefix}.w1.weight"], gate_up[3, :I])
    assert torch.equal(theirs[f"{prefix}.w3.weight"], gate_up[3, I:])
    assert torch.equal(theirs[f"{prefix}.w2.weight"], down[3])
    assert torch.equal(theirs[f"{prefix}.w2.weight_scale"][:, 0], ours["model.layers.1.mlp.experts.down_scale"][3])
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"]


def test_static_per_tensor_dense_exports_input_scales(checkpoints, tmp_path):
    ckpt = checkpoints("tiny-llama", act="per-tensor")
    out = export_checkpoint(ckpt, tmp_path / "ct")
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.input_scale"].shape == (1,)
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == ("tensor", False)
    ids = tokens(1, 12, 1)
    with torch.no_grad():
        assert torch.equal(load_compressed_tensors(out)(ids).logits, load_quantized(ckpt)(ids).logits)


@pytest.mark.parametrize("name, recipe, message", [
    ("tiny-mixtral-random", {"act": "per-tensor"}, "per-token activations only"),
    ("tiny-llama", {"abits": 16}, "needs a W8A8 checkpoint"),
    ("tiny-llama", {"abits": 6}, "needs a W8A8 checkpoint"),
])
def test_unsupported_checkpoints_are_refused(checkpoints, tmp_path, name, recipe, message):
    ckpt = checkpoints(name, **recipe)
    with pytest.raises(HaqError, match=message):
        export_checkpoint(ckpt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_bad_input_is_refused_and_nothing_is_half_written(tiny_dir, checkpoints, tmp_path):
    with pytest.raises(HaqError, match="not a haq checkpoint"):
        export_checkpoint(tiny_dir("tiny-llama"), tmp_path / "ct")
    ckpt = shutil.copytree(checkpoints("tiny-llama"), tmp_path / "q")  # tampered below
    with pytest.raises(HaqError, match="unknown export format"):
        export_checkpoint(ckpt, tmp_path / "ct", fmt="gguf")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(HaqError, match="refusing to overwrite"):
        export_checkpoint(ckpt, other)
    assert (other / "keep.txt").read_text() == "mine"
    export_checkpoint(ckpt, tmp_path / "ct")
    export_checkpoint(ckpt, tmp_path / "ct")  # a previous export is replaced
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(HaqError, match="checksum"):
        export_checkpoint(ckpt, tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()
    with pytest.raises(HaqError, match="not a compressed-tensors"):
        load_compressed_tensors(tiny_dir("tiny-llama"))


def test_eval_reads_an_export_as_the_checkpoint_it_came_from(tmp_path, capsys):
    """`haq eval EXPORT` loads the compressed-tensors folder through haq's reader (it used to stop
    at transformers asking for the compressed-tensors package): the same perplexity as the checkpoint."""
    from haq import zoo
    from haq.cli import main

    q, ct = tmp_path / "q", tmp_path / "ct"
    assert main(["quantize", str(zoo.build("tiny-mixtral")), "--method", "rtn", "--nsamples", "2", "--seqlen", "16",
                 "-o", str(q)]) == 0
    assert main(["export", str(q), "-o", str(ct)]) == 0
    for folder in (q, ct):
        assert main(["eval", str(folder), "--seqlen", "16", "--max-windows", "2", "--json", f"{folder}.json"]) == 0
    ppl = [json.loads((tmp_path / f"{n}.json").read_text())["ppl"] for n in ("q", "ct")]
    assert ppl[0] == ppl[1]
    config = json.loads((ct / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (ct / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["eval", str(ct), "--seqlen", "16", "--max-windows", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is quantized (gptq" in err and "\n" not in err
