"""Offloaded quantization: layers read one at a time from the shards must be exactly the layers
transformers loads, the quantized result exactly the in-memory one, and a checkpoint that does not
fit its config a one-line error."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from haq import api
from haq.checkpoint.layer_source import LayerSource
from haq.tensorfile import save_streamed
from haq.errors import HaqError
from haq.loading import load_model
from haq.quant.recipe import Recipe

FAMILIES = ["tiny-llama", "tiny-mixtral-random", "tiny-opt", "tiny-qwen2-moe", "tiny-deepseek-v2", "tiny-gemma3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_layers_from_the_shards_are_the_layers_transformers_loads(tiny_dir, name):
    from transformers import AutoModelForCausalLM

    path = tiny_dir(name)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    source = LayerSource.open(path)
    ref_layers = source.adapter.decoder_layers(ref)
    assert all(p.is_meta for p in source.layers.parameters())  # nothing of a layer before it is loaded
    for index in range(len(ref_layers)):
        ours, theirs = source.load(index).state_dict(), ref_layers[index].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    buffers = dict(ref.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in source.model.named_buffers())  # rotary tables, scales
    ids = torch.arange(1, 24)[None]
    # Equal weights; the forward only to float rounding: transformers' tensors are views into the
    # mmapped file (8-byte aligned), ours are allocated (64-byte), and some CPUs' GEMMs (AMD EPYC
    # here) then sum in another order.
    torch.testing.assert_close(source.model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,recipe", [("tiny-mixtral", Recipe(method="haq")),
                                         ("tiny-llama", Recipe(method="haq", rotate="on")),
                                         ("tiny-mixtral", Recipe(method="rtn", rotate="on"))])
def test_offloaded_quantization_equals_the_in_memory_one(tmp_path, name, recipe):
    """Same recipe, same windows: the same checkpoint tensors and logits, with the layers streamed
    (and, with --rotate, each layer rotated as it loads)."""
    outs = {}
    for offload in (False, True):
        out = api.quantize(name, recipe, tmp_path / f"q{offload}", nsamples=4, seqlen=64,
                           progress=False, offload=offload)
        outs[offload] = out
    ours, theirs = load_file(outs[True] / "model.safetensors"), load_file(outs[False] / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    model, _, _ = load_model(outs[True])  # verified: checksums, specs
    reference, _, _ = load_model(outs[False])
    ids = torch.arange(1, 40)[None]
    assert torch.equal(model(ids).logits, reference(ids).logits)
    assert not (tmp_path / ".qTrue.partial").exists()


def _copy_without(src, dst, drop: str):
    dst.mkdir()
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            (dst / file.name).write_bytes(file.read_bytes())
    state = load_file(src / "model.safetensors")
    save_file({k: v for k, v in state.items() if drop not in k}, dst / "model.safetensors")


def test_a_missing_expert_tensor_is_named(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    _copy_without(tiny_dir("tiny-mixtral-random"), broken, "layers.1.block_sparse_moe.experts.2.w3")
    source = LayerSource.open(broken)
    source.load(0)
    with pytest.raises(HaqError, match=r"layer 1: 1 weights are missing or incomplete.*experts.gate_up_proj"):
        source.load(1)


def test_a_tensor_the_config_does_not_describe_is_refused(tiny_dir, tmp_path):
    odd = tmp_path / "odd"
    _copy_without(tiny_dir("tiny-llama"), odd, "no-such-key")
    state = load_file(odd / "model.safetensors")
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(state, odd / "model.safetensors")
    with pytest.raises(HaqError, match="model.layers.0.mlp.extra.weight has no place in the model"):
        LayerSource.open(odd).load(0)


def test_sharded_checkpoints_are_read_through_their_index(tiny_dir, tmp_path):
    """save_pretrained's sharded layout (an index naming the shards) loads like one file."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_dir("tiny-qwen2-moe"), dtype=torch.float32)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    source = LayerSource.open(tmp_path / "sharded")
    theirs = source.adapter.decoder_layers(ref)[1].state_dict()
    ours = source.load(1).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_streamed_safetensors_reads_back_as_written(tmp_path):
    part = {"a.w": torch.randn(3, 5).to(torch.bfloat16), "a.q": torch.randint(-127, 128, (7,), dtype=torch.int8)}
    save_file(part, tmp_path / "part.safetensors")
    save_file(part, tmp_path / "again.safetensors")  # a second part: the writer goes back and forth by dtype
    memory = {"s": torch.tensor(0.5), "flag": torch.tensor([True, False]), "big": torch.randn(4, 4, dtype=torch.float64)}
    save_streamed(tmp_path / "out.safetensors", memory, [("layers.0.", tmp_path / "part.safetensors"),
                                                         ("layers.1.", tmp_path / "again.safetensors")], {"format": "x"})
    back = load_file(tmp_path / "out.safetensors")
    expected = {**memory, **{f"layers.{i}.{k}": v for i in (0, 1) for k, v in part.items()}}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in expected.items())


def test_an_interrupted_offloaded_run_resumes_to_the_same_checkpoint(tmp_path, interrupt_second_layer):
    recipe = Recipe(method="gptq")
    straight = api.quantize("tiny-mixtral", recipe, tmp_path / "straight", nsamples=4, seqlen=64, progress=False,
                            offload=True)
    calls = interrupt_second_layer()
    with pytest.raises(KeyboardInterrupt):
        api.quantize("tiny-mixtral", recipe, tmp_path / "q", nsamples=4, seqlen=64, progress=False, offload=True)
    resumed = api.quantize("tiny-mixtral", recipe, tmp_path / "q", nsamples=4, seqlen=64, progress=False, offload=True)
    assert calls == [0, 1, 1, 2, 3]  # layer 0 came from the resume folder
    ours, theirs = load_file(resumed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_offload_of_a_checkpoint_without_safetensors_is_a_clear_error(tiny_dir, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tiny_dir("tiny-llama") / "config.json").read_text())
    torch.save(load_file(tiny_dir("tiny-llama") / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(HaqError, match="no .safetensors weights"):
        LayerSource.open(tmp_path / "bin")


def test_a_truncated_shard_is_a_clear_error(tiny_dir, tmp_path):
    cut = tmp_path / "cut"
    _copy_without(tiny_dir("tiny-llama"), cut, "no-such-key")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(HaqError, match="cannot open the weight shard"):
        LayerSource.open(cut)
