"""A float checkpoint read one decoder layer at a time (sequential onloading), so a model larger
than host memory can be quantized: the model is built on the meta device, everything outside the
decoder layers (embeddings, final norm, lm_head, rotary tables) is materialized from the
safetensors shards, and `load(i)` / `release(i)` bring layer i into memory and drop it again.

Checkpoints store experts one module per expert (Mixtral's `block_sparse_moe.experts.E.w1/w3/w2`,
Qwen/DeepSeek's `mlp.experts.E.gate_proj/up_proj/down_proj`); transformers 5.x modules hold them
fused (`experts.gate_up_proj` [E, 2I, H], gate rows first, and `experts.down_proj` [E, H, I]).
`EXPERT_LAYOUTS` describes those layouts as data; every tensor of a layer must be filled exactly
once and every checkpoint tensor under the layer used, or loading fails with the names."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from haq.errors import HaqError
from haq.models.adapters import ArchAdapter

RENAMES = ((".block_sparse_moe.", ".mlp."),)
"""Module renames between checkpoint keys and transformers 5.x module paths (Mixtral's MoE block)."""

EXPERT_LAYOUTS = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
"""Per-expert checkpoint names of (gate, up, down), as Mixtral and as Qwen2-MoE/DeepSeek write them."""

_EXPERT_KEY = re.compile(r"(?P<experts>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")


class _Released(nn.Module):
    """Where a quantized layer was: it has been written to disk and freed."""

    def forward(self, *args, **kwargs):
        raise HaqError("internal: a released decoder layer was run (offloaded quantization runs each layer once)")


class ShardedCheckpoint:
    """Tensor names -> safetensors files of a model folder. Files are opened per read and closed
    after: a memory-mapped shard's pages count as resident while it is open."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise HaqError(f"{index} is not a safetensors index ({exc}): re-save the model") from None
        else:
            files = sorted(f.name for f in path.glob("*.safetensors"))
        if not files:
            raise HaqError(f"{path} has no .safetensors weights: offloaded quantization reads safetensors shards "
                           "(convert the checkpoint with save_pretrained(safe_serialization=True))")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, list[int]] = {}
        for name in files:
            try:
                with safe_open(path / name, "pt") as handle:
                    for key in handle.keys():
                        self.where[key] = path / name
                        self.shapes[key] = list(handle.get_slice(key).get_shape())
            except Exception as exc:  # noqa: BLE001 - a missing or corrupt shard, whatever safetensors raises
                raise HaqError(f"cannot open the weight shard {path / name}: {exc}") from None

    def keys_under(self, prefix: str) -> list[str]:
        return [key for key in self.where if key.startswith(prefix)]

    def read(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for `keys`, one file open at a time."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.where[key], []).append(key)
        for file, names in by_file.items():
            with safe_open(file, "pt") as handle:
                for key in names:
                    yield key, handle.get_tensor(key)


def _module_key(key: str) -> str:
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


def _fill(params: dict[str, torch.Tensor], ckpt: ShardedCheckpoint, source_keys: list[str], where: str) -> None:
    """Copy every checkpoint tensor in `source_keys` into `params` (module-relative names),
    fusing per-expert tensors; each parameter must be written exactly once."""
    written: dict[str, int] = {}
    slots = {name: slot for layout in EXPERT_LAYOUTS for slot, name in enumerate(layout)}  # 0 gate, 1 up, 2 down
    for key, tensor in ckpt.read(source_keys):
        target = _module_key(key)
        match = _EXPERT_KEY.match(target)
        if target in params:
            part = params[target]
        elif match and match["proj"] in slots:
            slot = slots[match["proj"]]
            fused = f"{match['experts']}.{'down_proj' if slot == 2 else 'gate_up_proj'}"
            if fused not in params:
                raise HaqError(f"{where}: checkpoint tensor {key} has no place in the model ({fused} missing)")
            target, e = fused, int(match["e"])
            half = params[fused].shape[1] // 2
            part = params[fused][e] if slot == 2 else params[fused][e, slot * half:(slot + 1) * half]
        else:
            raise HaqError(f"{where}: checkpoint tensor {key} has no place in the model: the config does not "
                           "describe these weights")
        if tensor.shape != part.shape:
            raise HaqError(f"{where}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(part.shape)}")
        part.copy_(tensor)
        written[target] = written.get(target, 0) + part.numel()
    wrong = [name for name, p in params.items() if written.get(name, 0) != p.numel()]
    if wrong:
        raise HaqError(f"{where}: {len(wrong)} weights are missing or incomplete in the checkpoint ({', '.join(wrong[:3])}"
                       "...): incomplete or not an HF checkpoint")


def _materialize(module: nn.Module) -> None:
    """Real (uninitialized) CPU storage for the module's own meta parameters and buffers."""
    for name, param in list(module._parameters.items()):
        if param is not None and param.is_meta:
            module._parameters[name] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                    requires_grad=param.requires_grad)
    for name, buffer in list(module._buffers.items()):
        if buffer is not None and buffer.is_meta:
            module._buffers[name] = torch.empty_like(buffer, device="cpu")


class LayerSource:
    """The model skeleton of a float checkpoint, and its decoder layers on demand."""

    def __init__(self, path: Path, model: nn.Module, adapter: ArchAdapter):
        self.path, self.model, self.adapter = path, model, adapter
        self.ckpt = ShardedCheckpoint(path)
        self.layers = adapter.decoder_layers(model)
        self.skeletons = list(self.layers)  # the layers as built on meta, materialized in place when loaded

    @classmethod
    def open(cls, path: Path, dtype: torch.dtype = torch.float32) -> LayerSource:
        """Build the model on meta and load everything but the decoder layers."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from haq.models.adapters import adapter_for

        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - see haq.loading: any failure here is the folder's
            raise HaqError(f"{path / 'config.json'} is not a usable model config ({type(exc).__name__})") from None
        adapter = adapter_for(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()  # eval: no dropout (OPT)
        source = cls(path, model, adapter)
        in_layers = {id(m) for m in source.layers.modules()}
        rest = [m for m in model.modules() if id(m) not in in_layers]
        for module in rest:
            _materialize(module)
        for module in rest:  # non-persistent buffers (rotary tables, embedding scales) as transformers makes them
            model._init_weights(module)
        prefix = adapter.layers + "."
        params = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
        tied = getattr(config, "tie_word_embeddings", False)
        keys = [k for k in source.ckpt.where if not k.startswith(prefix) and not (tied and k == "lm_head.weight")]
        if tied:
            params.pop("lm_head.weight", None)
        with torch.no_grad():
            _fill(params, source.ckpt, keys, str(path))
        if tied:
            model.tie_weights()
        return source

    def load(self, index: int) -> nn.Module:
        """Decoder layer `index`, in memory with its checkpoint weights."""
        layer = self.skeletons[index]
        for module in layer.modules():
            _materialize(module)
            if module._non_persistent_buffers_set:
                self.model._init_weights(module)
        prefix = f"{self.adapter.layers}.{index}."
        params = {f"{prefix}{k}": v for k, v in layer.state_dict().items()}
        with torch.no_grad():
            _fill(params, self.ckpt, self.ckpt.keys_under(prefix), f"{self.path} layer {index}")
        self.layers[index] = layer
        return layer

    def release(self, index: int) -> None:
        """Drop layer `index` (its quantized state is on disk): the memory bound holds one layer."""
        self.layers[index] = _Released()
        self.skeletons[index] = None
