"""Export a haq W8A8 checkpoint to the compressed-tensors "int-quantized" layout that vLLM loads.

The export is a pure rewrite of tensors: no model is built and nothing is re-quantized, so the
int8 levels and scales are bit for bit the ones haq computed. For every quantized linear
(names as in the model's original HF checkpoint, which vLLM reads):

    <name>.weight        int8 [out, in]     = Int8Linear.qweight
    <name>.weight_scale  float32 [out, 1]   = Int8Linear.w_scale (per output channel)
    <name>.input_scale   float32 [1]        only for static per-tensor activations

Fused experts (transformers 5 ``*Experts``: gate_up_q [E, 2I, H], down_q [E, H, I]) are split
back into the per-expert linears of the HF checkpoint (Mixtral ``block_sparse_moe.experts.E.w1``
= gate, ``w3`` = up, ``w2`` = down; Qwen-MoE ``mlp.experts.E.gate_proj/up_proj/down_proj``),
which is what vLLM's int8 fused-MoE loader and llm-compressor's own saves use. Everything else
(embeddings, norms, routers, lm_head) is copied as it is and listed in ``ignore``.

``config.json`` gets a ``quantization_config`` (``quant_method: compressed-tensors``, format
``int-quantized``, status ``compressed``): weights int8 symmetric per channel, activations int8
symmetric dynamic per token (or static per tensor). haq's grid is [-127, 127]; compressed-tensors'
is [-128, 127], a superset, so dynamic scales (absmax / 127) give identical levels.

``--rotate``'s online input rotations (x -> x R before quantizing, the weight stored as W R) export
as a compressed-tensors ``transform_config``: one random-hadamard scheme applied at those linears'
inputs, each matrix stored as ``<name>.online_input_input.weight`` = sqrt(n) R, +-1 (vLLM and
compressed-tensors apply x W / sqrt(n)). Like compressed-tensors' own factories, which make one
shared matrix per order and save it once (its other targets are tied weights), the export stores
one matrix per order, under its first target; haq's rotation of an order is one seeded matrix, so
every expert's down and every dense down_proj of that width share it. haq builds R as a randomized
Hadamard matrix wherever one of that order exists (:meth:`haq.kernels.rotation.OnlineRotation.seeded`);
other orders refuse.

``load_compressed_tensors`` reads an export back into haq's int8 modules (the round trip the
tests check); the check against compressed-tensors itself lives in ``bench/peers.py``.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from haq.checkpoint.weights import sha256_file
from haq.errors import HaqError
from haq.io import atomic_dir, check_output_dir

log = logging.getLogger(__name__)

ExportFormat = Literal["compressed-tensors"]
FORMATS: tuple[str, ...] = ("compressed-tensors",)
WEIGHTS_NAME = "model.safetensors"
TRANSFORM_NAME = "online_input"  # the transform scheme of --rotate's online input rotations
PROVENANCE_NAME = "haq_export.json"  # not haq_config.json: the export is not a haq checkpoint
# Files copied from the checkpoint as they are (tokenizer, generation defaults, chat template).
COPIED_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "generation_config",
                   "chat_template")


@dataclass(frozen=True)
class CheckpointNames:
    """How one family's tensors are named in its HF checkpoints, where transformers 5 module paths
    differ. ``renames``: (module-path substring, checkpoint substring); ``expert_proj``: the
    checkpoint names of one expert's gate, up and down linears."""

    renames: tuple[tuple[str, str], ...] = ()
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def to_disk(self, path: str) -> str:
        for ours, theirs in self.renames:
            path = path.replace(ours, theirs)
        return path

    def from_disk(self, path: str) -> str:
        for ours, theirs in self.renames:
            path = path.replace(theirs, ours)
        return path


# transformers' conversion_mapping.py, read backwards (tested against save_pretrained's keys).
CHECKPOINT_NAMES: dict[str, CheckpointNames] = {
    "llama": CheckpointNames(),
    "mistral": CheckpointNames(),
    "opt": CheckpointNames(),
    "mixtral": CheckpointNames(renames=((".mlp.", ".block_sparse_moe."),), expert_proj=("w1", "w3", "w2")),
    "qwen2_moe": CheckpointNames(),
    "qwen3_moe": CheckpointNames(),
}


def quantization_config(strategy: Literal["token", "tensor"], ignore: list[str]) -> dict:
    """compressed-tensors' config for int8 W8A8: weights per channel (static), activations per
    token (dynamic) or per tensor (static, calibrated ``input_scale``)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                            "dynamic": False, "group_size": None, "block_structure": None, "actorder": None,
                            "observer": "minmax", "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy,
                                      "dynamic": strategy == "token", "group_size": None,
                                      "block_structure": None, "actorder": None,
                                      "observer": None if strategy == "token" else "minmax",
                                      "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None},
                "output_activations": None,
                "format": "int-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
    }


def _hadamard_weight(path: str, state: dict[str, torch.Tensor], attr: str = "online_rotation") -> torch.Tensor:
    """sqrt(n) R of the module's online rotation x -> x R (`attr`: experts' `down_rotation`), +-1 (exact
    in bf16): what a compressed-tensors Hadamard transform stores, applied online as x W / sqrt(n)."""
    A, B = state[f"{path}.{attr}.A"].double(), state[f"{path}.{attr}.B"].double()
    n = A.shape[0] * B.shape[0]
    W = torch.kron(A, B) * n ** 0.5
    if not bool(((W.abs() - 1).abs() < 1e-4).all()):
        raise HaqError(f"module {path} rotates its input at run time with a matrix that is not a Hadamard matrix "
                       f"(haq has none of order {n}), and compressed-tensors transforms store +-1 Hadamard "
                       "matrices: export a checkpoint quantized without --rotate")
    return W.round().to(torch.bfloat16).contiguous()


def transform_config(targets: list[str]) -> dict:
    """compressed-tensors' ``transform_config`` for online input rotations of ``targets`` (checkpoint
    module names): one random-hadamard scheme, applied at the input only, since the weights are
    stored already rotated (W R); the matrix of each order is ``<first target>.online_input_input.weight``."""
    if not targets:
        return {}
    args = {"targets": targets, "location": "input", "inverse": False, "ignore": []}
    scheme = {"type": "random-hadamard", "apply": [args], "randomize": False, "requires_grad": False,
              "head_dim": None, "precision": "torch.float32"}
    return {"config_groups": {TRANSFORM_NAME: scheme}}


def rotated_targets(specs: dict[str, dict], names: CheckpointNames) -> list[str]:
    """Checkpoint names of the modules whose inputs rotate online: linears and every expert's down."""
    targets = []
    for path, spec in specs.items():
        if spec.get("rotation"):
            targets.append(names.to_disk(path))
        if spec.get("down_rotation"):
            targets += [f"{names.to_disk(path)}.{e}.{names.expert_proj[2]}" for e in range(spec["experts"])]
    return targets


def _check_exportable(meta: dict) -> Literal["token", "tensor"]:
    recipe, modules = meta["recipe"], meta["modules"]
    if recipe.get("method") == "fp" or not modules:
        raise HaqError("the checkpoint has no quantized modules: nothing to export")
    if recipe.get("wbits") != 8 or recipe.get("abits") != 8:
        raise HaqError(f"compressed-tensors export needs a W8A8 checkpoint (int8 kernels in vLLM); this one is "
                       f"W{recipe.get('wbits')}A{recipe.get('abits')}: re-quantize with --wbits 8 --abits 8")
    if "lm_head" in modules:
        raise HaqError("the checkpoint's lm_head is int8 (quantize_lm_head): vLLM's compressed-tensors W8A8 path "
                       "keeps the lm_head in high precision; re-quantize without --quantize-lm-head to export")
    modes = {spec.get("act_mode") for spec in modules.values() if spec["type"] in ("int8_linear", "int8_experts")}
    if len(modes) != 1:  # the module specs, not the recipe, say what the weights were made for
        raise HaqError(f"the checkpoint's int8 modules mix activation modes {sorted(map(str, modes))}: "
                       "compressed-tensors takes one per model")
    act = modes.pop()
    moe = any(spec["type"] == "int8_experts" for spec in modules.values())
    if act == "per-tensor" and moe:
        raise HaqError("vLLM's int8 fused-MoE takes dynamic per-token activations only; this MoE checkpoint "
                       "uses static per-tensor scales: re-quantize with --act per-token")
    return "token" if act == "per-token" else "tensor"


def to_compressed_tensors(state: dict[str, torch.Tensor], specs: dict[str, dict],
                          names: CheckpointNames) -> dict[str, torch.Tensor]:
    """haq checkpoint tensors (module paths of transformers 5) -> compressed-tensors tensors
    (HF checkpoint names). ``specs``: quantized module path -> spec, as in haq_config.json."""
    out: dict[str, torch.Tensor] = {}
    shared: dict[int, torch.Tensor] = {}  # order -> the one stored matrix

    def rotate(disk: str, path: str, attr: str) -> None:
        W = _hadamard_weight(path, state, attr)
        first = shared.setdefault(W.shape[0], W)
        if first is W:
            out[f"{disk}.{TRANSFORM_NAME}_input.weight"] = W
        elif not torch.equal(first, W):
            raise HaqError(f"module {path} rotates its inputs with another matrix of order {W.shape[0]} than an "
                           "earlier module, and compressed-tensors shares one matrix per order: re-quantize with "
                           "--rotate auto or on (one seeded rotation per width)")

    def put(disk: str, qweight: torch.Tensor, scale: torch.Tensor, in_scale: torch.Tensor | None) -> None:
        out[f"{disk}.weight"] = qweight.contiguous()
        out[f"{disk}.weight_scale"] = scale.reshape(-1, 1).float().contiguous()  # [out, 1]
        if in_scale is not None:
            out[f"{disk}.input_scale"] = in_scale.reshape(1).float().contiguous()

    for path, spec in specs.items():
        disk = names.to_disk(path)
        if spec.get("rotation"):
            rotate(disk, path, "online_rotation")
        if spec["type"] == "int8_linear":
            put(disk, state[f"{path}.qweight"], state[f"{path}.w_scale"], state.get(f"{path}.input_scale"))
            if f"{path}.bias" in state:
                out[f"{disk}.bias"] = state[f"{path}.bias"]
        elif spec["type"] == "int8_experts":
            # E = experts, I = intermediate: gate_up_q [E, 2I, H] gate rows first, down_q [E, H, I]
            I = spec["intermediate"]
            gate_up, gate_up_s = state[f"{path}.gate_up_q"], state[f"{path}.gate_up_scale"]
            down, down_s = state[f"{path}.down_q"], state[f"{path}.down_scale"]
            gate_up_in, down_in = state.get(f"{path}.gate_up_in_scale"), state.get(f"{path}.down_in_scale")
            gate, up, down_name = names.expert_proj
            for e in range(spec["experts"]):
                if spec.get("down_rotation"):
                    rotate(f"{disk}.{e}.{down_name}", path, "down_rotation")
                gu_in = None if gate_up_in is None else gate_up_in[e]
                put(f"{disk}.{e}.{gate}", gate_up[e, :I], gate_up_s[e, :I], gu_in)
                put(f"{disk}.{e}.{up}", gate_up[e, I:], gate_up_s[e, I:], gu_in)
                put(f"{disk}.{e}.{down_name}", down[e], down_s[e], None if down_in is None else down_in[e])
        else:
            raise HaqError(f"module {path} is {spec['type']}: only W8A8 modules export to int-quantized")
    owned = tuple(f"{path}." for path in specs)
    for key, tensor in state.items():
        if not key.startswith(owned):
            out[names.to_disk(key)] = tensor.contiguous()
    return out


def _ignored(config: dict, specs: dict[str, dict], names: CheckpointNames) -> list[str]:
    """Linears kept in high precision: lm_head and each layer's routers / shared-expert gates."""
    from types import SimpleNamespace

    from haq.models.adapters import adapter_for

    layout = SimpleNamespace(**config)
    adapter = adapter_for(layout)
    ignore = ["lm_head"]
    for index in range(config["num_hidden_layers"]):
        for module in adapter.layer_spec(layout, index).high_precision:
            ignore.append(names.to_disk(f"{adapter.layers}.{index}.{module}"))
    return ignore


def export_checkpoint(src: str | Path, out: str | Path, fmt: ExportFormat = "compressed-tensors") -> Path:
    """Write the haq checkpoint ``src`` as a compressed-tensors int-quantized folder ``out``
    (atomically: ``out`` is replaced only when complete)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from haq.checkpoint.native import WEIGHTS_NAME as HAQ_WEIGHTS, read_quant_config, verify_files

    if fmt not in FORMATS:
        raise HaqError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    src, out = Path(src), Path(out)
    if not (src / "haq_config.json").is_file():
        raise HaqError(f"{src} is not a haq checkpoint (no haq_config.json): run `haq quantize` first")
    if out.resolve() == src.resolve():
        raise HaqError("the export folder must differ from the checkpoint folder")
    check_output_dir(out, PROVENANCE_NAME, "haq export", COPIED_PREFIXES + (WEIGHTS_NAME, PROVENANCE_NAME, "config.json"))
    meta = read_quant_config(src)
    strategy = _check_exportable(meta)
    verify_files(src, meta)
    weights, digest = src / HAQ_WEIGHTS, meta["files"][HAQ_WEIGHTS]
    if not any(f.name.startswith("tokenizer") for f in src.iterdir()):
        log.warning("%s has no tokenizer: the export cannot be served until one is copied into %s", src, out)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise HaqError(f"{weights} is not a readable safetensors file: {exc}") from None
    config = json.loads((src / "config.json").read_text())
    names = CHECKPOINT_NAMES.get(config.get("model_type"))
    if names is None:
        raise HaqError(f"no compressed-tensors names for architecture {config.get('model_type')!r}; "
                       f"supported: {', '.join(CHECKPOINT_NAMES)}")
    tensors = to_compressed_tensors(state, meta["modules"], names)
    config["quantization_config"] = quantization_config(strategy, _ignored(config, meta["modules"], names))
    config["quantization_config"]["transform_config"] = transform_config(rotated_targets(meta["modules"], names))
    with atomic_dir(out) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for extra in src.iterdir():
            if extra.is_file() and extra.name.startswith(COPIED_PREFIXES):
                shutil.copy2(extra, tmp / extra.name)
        provenance = {"format": fmt, "source": str(src.resolve()), "source_sha256": digest,
                      "weights_sha256": sha256_file(tmp / WEIGHTS_NAME),  # haq's reader checks it
                      "recipe": meta["recipe"], "versions": meta.get("versions", {})}
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def _verify_export(path: Path) -> None:
    """haq's own export records its weights' checksum (another tool's folder has none to check)."""
    provenance = path / PROVENANCE_NAME
    if not provenance.is_file():
        return
    try:
        expected = json.loads(provenance.read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        raise HaqError(f"{provenance} is not haq's export record (JSON with weights_sha256): re-run `haq export`") \
            from None
    weights = path / WEIGHTS_NAME
    if expected is not None and (not weights.is_file() or sha256_file(weights) != expected):
        raise HaqError(f"{weights} is missing or does not match the checksum in {provenance.name}: truncated or "
                       "modified; re-run `haq export`")


def load_compressed_tensors(path: str | Path, backend: str | None = None, fuse: bool = False):
    """Read an int-quantized compressed-tensors folder (channel weights, token or tensor
    activations) back into haq's int8 modules (on `backend`, default the CPU's; `fuse` as in
    `load_quantized`); returns the model (eval mode)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from haq.checkpoint.weights import load_state_checked
    from haq.models.adapters import adapter_for
    from haq.kernels.specs import install_specs

    path = Path(path)
    _verify_export(path)
    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: None)()
    if not qc or qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "int-quantized":
        raise HaqError(f"{path} is not a compressed-tensors int-quantized checkpoint")
    group = next(iter(qc["config_groups"].values()))
    act_mode = {"token": "per-token", "tensor": "per-tensor"}.get(group["input_activations"]["strategy"])
    if act_mode is None or group["weights"]["strategy"] != "channel" or group["weights"]["num_bits"] != 8:
        raise HaqError(f"{path}: only int8 per-channel weights with per-token or per-tensor activations load here")
    names = CHECKPOINT_NAMES[config.model_type]
    disk = load_file(path / WEIGHTS_NAME)
    adapter = adapter_for(config)
    del config.quantization_config  # build the plain float architecture
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state, specs, used = {}, {}, set()
    experts = ([f"{adapter.layers}.{i}.{adapter.moe.experts}" for i in adapter.moe_layers(config)]
               if adapter.moe is not None else [])
    gate, up, down = names.expert_proj
    for ours in experts:
        prefix = names.to_disk(ours)
        E = sum(1 for k in disk if k.startswith(f"{prefix}.") and k.endswith(f".{gate}.weight_scale"))
        get = lambda e, proj, what: disk[f"{prefix}.{e}.{proj}.{what}"]  # noqa: E731
        state[f"{ours}.gate_up_q"] = torch.stack([torch.cat([get(e, gate, "weight"), get(e, up, "weight")])
                                                  for e in range(E)])
        state[f"{ours}.gate_up_scale"] = torch.stack([torch.cat([get(e, gate, "weight_scale"),
                                                                 get(e, up, "weight_scale")])[:, 0] for e in range(E)])
        state[f"{ours}.down_q"] = torch.stack([get(e, down, "weight") for e in range(E)])
        state[f"{ours}.down_scale"] = torch.stack([get(e, down, "weight_scale")[:, 0] for e in range(E)])
        H, I = state[f"{ours}.down_q"].shape[1:]
        specs[ours] = {"type": "int8_experts", "experts": E, "hidden": H, "intermediate": I, "act_bits": 8,
                       "act_mode": act_mode}
        used |= {k for k in disk if k.startswith(f"{prefix}.")}
    for key in disk:
        if key.endswith(".weight_scale") and key not in used:
            theirs = key.removesuffix(".weight_scale")
            ours = names.from_disk(theirs)
            qweight = disk[f"{theirs}.weight"]
            state[f"{ours}.qweight"], state[f"{ours}.w_scale"] = qweight, disk[key][:, 0]
            if f"{theirs}.input_scale" in disk:
                state[f"{ours}.input_scale"] = disk[f"{theirs}.input_scale"].reshape(())
            if f"{theirs}.bias" in disk:
                state[f"{ours}.bias"] = disk[f"{theirs}.bias"]
            specs[ours] = {"type": "int8_linear", "in": qweight.shape[1], "out": qweight.shape[0],
                           "bias": f"{theirs}.bias" in disk, "act_bits": 8, "act_mode": act_mode,
                           "static": f"{theirs}.input_scale" in disk}
            used |= {f"{theirs}.{s}" for s in ("weight", "weight_scale", "input_scale", "bias")}
    stored = {disk[k].shape[0]: k for k in disk if k.endswith(f"{TRANSFORM_NAME}_input.weight")}
    for group in (qc.get("transform_config") or {}).get("config_groups", {}).values():
        for args in group["apply"]:
            if args["location"] != "input" or args.get("inverse") or group.get("head_dim"):
                raise HaqError(f"{path}: only whole-input transforms (location input, not inverted) load here, "
                               f"not {args}")
            for theirs in args["targets"]:
                ours = names.from_disk(theirs)
                owner = ours.rsplit(".", 2)[0]  # for an expert's down: the fused experts module
                if ours not in specs and owner in specs and specs[owner]["type"] == "int8_experts":
                    ours, attr = owner, "down_rotation"  # an expert's down: one rotation for the layer's experts
                else:
                    attr = "rotation"
                width = specs.get(ours, {}).get("intermediate" if attr == "down_rotation" else "in")
                key = stored.get(width)  # shared by every target of that order
                if key is None:
                    raise HaqError(f"{path}: transform target {theirs} has no quantized module or no stored matrix")
                W = (disk[key].double() / disk[key].shape[0] ** 0.5).float()  # x -> x W / sqrt(n)
                name = "online_rotation" if attr == "rotation" else attr
                if f"{ours}.{name}.B" in state and not torch.equal(state[f"{ours}.{name}.B"], W):
                    raise HaqError(f"{path}: the experts of {ours} rotate their down inputs differently; haq's "
                                   "int8 experts take one rotation per layer")
                state[f"{ours}.{name}.A"], state[f"{ours}.{name}.B"] = torch.ones(1, 1), W  # a (1, n) rotation
                specs[ours][attr] = [1, W.shape[0]]
                used.add(key)
    state.update({names.from_disk(k): v for k, v in disk.items() if k not in used})
    install_specs(model, specs, backend)
    load_state_checked(model, state, config, path)
    if fuse:
        from haq.checkpoint.native import fuse_model_inputs

        fuse_model_inputs(model)
    return model.eval()
