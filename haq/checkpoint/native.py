"""Quantized checkpoints: a folder with `model.safetensors` (int8 weights, scales, float rest),
`config.json`, the tokenizer and `haq_config.json` (recipe, module specs, per-layer alphas and
damping, calibration identity, versions, the weights' sha256). Written into a temp folder and
renamed into place; verified on load so a truncated or altered file is refused clearly."""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from haq.errors import HaqError
from haq.io import atomic_dir, check_output_dir
from haq.checkpoint.weights import load_state_checked, sha256_file
from haq.kernels.specs import install_specs
from haq.quant.report import QuantReport

FORMAT = "haq-int8-v1"
CONFIG_NAME = "haq_config.json"
WEIGHTS_NAME = "model.safetensors"
SELF_CHECKSUM = "config_sha256"
OWN_FILES = (WEIGHTS_NAME, CONFIG_NAME, "config.json", "generation_config.json", "tokenizer", "special_tokens_map",
             "added_tokens", "vocab", "merges", "chat_template")
"""Names (prefixes) a checkpoint folder holds; anything else in an output folder is the user's."""


def _versions() -> dict:
    import transformers

    from haq import __version__

    return {"haq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage)."""
    state, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        state[name] = tensor.detach().contiguous()
    return state


def save_quantized(model: nn.Module, tokenizer, out: Path, report: QuantReport, calibration: dict,
                   layer_files: list[tuple[str, Path]] = ()) -> Path:
    """`layer_files`: (key prefix, safetensors file) of layers that are on disk, not in `model`
    (an offloaded quantization); their tensors are streamed into the weights file one at a time."""
    from safetensors.torch import save_file

    from haq.tensorfile import save_streamed

    out = Path(out)
    check_output_dir(out, CONFIG_NAME, "haq checkpoint", OWN_FILES)
    with atomic_dir(out) as tmp:
        if layer_files:
            save_streamed(tmp / WEIGHTS_NAME, _state_to_save(model), list(layer_files), {"format": FORMAT})
        else:
            save_file(_state_to_save(model), tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "format": FORMAT,
            "recipe": report.recipe,
            "rotated": report.rotated,
            "modules": report.modules,
            "layers": [asdict(layer) for layer in report.layers],
            "quant_seconds": report.seconds,
            "calibration": {**calibration, "tokens": report.calib_tokens},
            "versions": _versions(),
            "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()},
        }
        meta[SELF_CHECKSUM] = config_digest(meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_quant_config(path: Path) -> dict:
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise HaqError(f"{path / CONFIG_NAME} is unreadable or not JSON ({exc}); re-run `haq quantize`") from None
    if not isinstance(meta, dict):
        raise HaqError(f"{path / CONFIG_NAME} is not a JSON object: re-run `haq quantize`")
    if meta.get("format") != FORMAT:
        raise HaqError(f"{path / CONFIG_NAME}: unknown format {meta.get('format')!r}, expected {FORMAT}")
    if SELF_CHECKSUM not in meta:
        raise HaqError(f"{path / CONFIG_NAME} has no checksum of its own (written by an older haq, or edited): "
                       "its recipe and specs cannot be trusted; re-run `haq quantize`")
    if meta[SELF_CHECKSUM] != config_digest(meta):
        raise HaqError(f"{path / CONFIG_NAME} was edited after it was written (its checksum no longer matches): "
                       "the recipe and module specs must be the ones the weights were made with; re-run `haq quantize`")
    return meta


def config_digest(meta: dict) -> str:
    """sha256 of the config without its own checksum, canonical JSON: edits to the recipe or the
    module specs are caught like edits to the weights."""
    body = json.dumps({k: v for k, v in meta.items() if k != SELF_CHECKSUM}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def verify_files(path: Path, meta: dict) -> None:
    """Every file the save wrote (weights, config.json, tokenizer) must be there and unchanged."""
    files = meta.get("files")
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        raise HaqError(f"{path / CONFIG_NAME} lists no weight checksums; re-run `haq quantize`")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise HaqError(f"{file} is missing: the checkpoint is incomplete (copy it whole, or re-run `haq quantize`)")
        if sha256_file(file) != digest:
            raise HaqError(f"{file} does not match the checksum in {CONFIG_NAME}: truncated or modified file")


def load_quantized(path: Path, verify: bool = True, backend: str | None = None, fuse: bool = True) -> nn.Module:
    """Rebuild the architecture, install the int8 modules named in haq_config.json, load tensors;
    `backend` overrides the int8 backend the module specs record. `fuse`: linears that read one
    input share one GEMM (`fuse_model_inputs`); off for a model whose tensors will be saved again."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = read_quant_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise HaqError(f"{weights} is missing")
    if verify:
        verify_files(path, meta)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - see haq.loading: any failure here is the folder's
        raise HaqError(f"{path / 'config.json'} is not a usable model config ({type(exc).__name__})") from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    install_specs(model, meta["modules"], backend)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise HaqError(f"{weights} is not a readable safetensors file: {exc}") from None
    load_state_checked(model, state, config, weights)
    model.haq_config = meta
    if fuse:
        fuse_model_inputs(model)
    return model.eval()


def fuse_model_inputs(model: nn.Module) -> int:
    """Fuse the int8 linears of every layer that read one norm's output (q/k/v; gate/up), so their
    input is quantized once (`haq.kernels.shared_input`); the number of groups fused."""
    from haq.kernels.shared_input import fuse_shared_inputs
    from haq.models.adapters import adapter_for

    adapter = adapter_for(model.config)
    fused = 0
    for index, layer in enumerate(adapter.decoder_layers(model)):
        spec = adapter.layer_spec(model.config, index)
        dense = set(spec.linears)
        groups = [[c for c in g.consumers if c in dense] for g in spec.norm_groups]
        fused += fuse_shared_inputs(layer, [g for g in groups if len(g) > 1])
    return fused
